package main

// bcast: N receivers and one sender, each set up with one echo round trip (so
// the server has registered it). Throughput phase: -inflight broadcasts in
// flight; a broadcast is complete when every receiver has it, and then the next
// one leaves. Receivers read their sockets only once -lowat broadcasts wait in
// them (SO_RCVLOWAT; see setLowat): the generator's read + ACK per delivery,
// its main cost at 10,000 receivers, is shared by -lowat deliveries. Then the
// latency phase: -lat broadcasts one at a time, read as they come, each timed
// from its write to the first and to the last receiver that reads it.
//
// Each receiver must get every broadcast, intact, once, in order.

import (
	"fmt"
	"strings"
	"syscall"
)

const bRing = 64 // > the most broadcasts in flight

type bcastMode struct {
	e        *engine
	echoPool *framePool
	pool     *framePool
	pad      string
	n        int
	sender   *conn
	ready    int
	window   int
	lowat    int // broadcasts per receiver wake-up in the throughput phase
	sending  bool
	counting bool
	latency  bool
	next     uint64 // next broadcast to send
	open     int    // in flight
	maxNext  uint64
	digits   [nDigits]byte

	sentAt   [bRing]int64
	firstAt  [bRing]int64
	count    [bRing]int32
	inWindow [bRing]bool

	deliveries, total, senderGot, other, bad, slow int64
	why                                            string
	completedWin, completedLat                     int64
	hLast, hFirst, latLast, latFirst               hist
}

func (m *bcastMode) opened(c *conn) { setupEcho(m.e, m.echoPool, c) }

func (m *bcastMode) message(c *conn, p []byte) {
	if !c.ready {
		if setupReply(c, p, m.e.proto, &m.other, &m.bad, &m.why) {
			m.ready++
		}
		return
	}
	if c == m.sender { // most servers send the sender its own broadcast too: not counted
		m.senderGot++
		return
	}
	v, fast := c.tmpl.match(p)
	if !fast {
		var vd verdict
		var why string
		v, vd, why = checkBroadcast(p, m.pad)
		switch vd {
		case vOther:
			m.other++
			return
		case vBad:
			m.bad++
			m.why = why
			return
		}
		m.slow++
	}
	i := v - nBase
	if v < nBase || i != c.bnext || i >= m.next {
		m.bad++
		m.why = fmt.Sprintf("receiver %d got broadcast %d, expected %d", c.id, int64(v)-nBase, c.bnext)
		return
	}
	if !fast {
		c.tmpl.learn(p, v)
		m.setLowat(c, len(p))
	}
	c.bnext++
	now := nanotime()
	slot := i % bRing
	m.count[slot]++
	m.total++
	if m.count[slot] == 1 {
		m.firstAt[slot] = now
	}
	if m.counting {
		m.deliveries++
	}
	if int(m.count[slot]) == m.n {
		m.complete(slot, now)
	}
}

// setLowat: in the throughput phase a receiver is woken (and reads, and ACKs) only once -lowat
// broadcasts wait in its socket, not for every one: fewer reads and ACK segments per delivery for
// the generator; the server writes exactly as before. Off (1 byte) for the drain and latency phases.
func (m *bcastMode) setLowat(c *conn, payload int) {
	v := 1
	if m.lowat > 1 && payload > 0 {
		frame := payload + 2
		if payload >= 126 {
			frame += 2
		}
		v = (m.lowat-1)*frame + 1
	}
	if c.fd >= 0 {
		syscall.SetsockoptInt(c.fd, syscall.SOL_SOCKET, syscall.SO_RCVLOWAT, v)
	}
}

func (m *bcastMode) complete(slot uint64, now int64) {
	last, first := now-m.sentAt[slot], m.firstAt[slot]-m.sentAt[slot]
	if m.latency {
		m.latLast[hIdx(last)]++
		m.latFirst[hIdx(first)]++
		m.completedLat++
	} else if m.inWindow[slot] {
		m.hLast[hIdx(last)]++
		m.hFirst[hIdx(first)]++
		m.completedWin++
	}
	m.count[slot] = 0
	m.open--
	m.fill(now)
}

func (m *bcastMode) fill(now int64) {
	for m.sending && m.open < m.window && m.next < m.maxNext {
		slot := m.next % bRing
		setDigits(&m.digits, nBase+m.next)
		m.sender.out = m.pool.appendSession(m.sender.out, &m.digits, m.sender.next(), m.sender.lastSeq)
		m.e.queued(m.sender)
		m.sentAt[slot], m.inWindow[slot] = now, m.counting
		m.next++
		m.open++
	}
}

func runBcast() map[string]any {
	m := &bcastMode{n: *flagN, window: *flagInflight, lowat: *flagLowat}
	if m.lowat > m.window/2 {
		m.lowat = m.window / 2
	}
	if m.window < 1 || m.window > bRing/2 {
		return map[string]any{"error": fmt.Sprintf("-inflight must be 1..%d", bRing/2)}
	}
	e, err := newEngine(*flagAddr, *flagPath, *flagProto, m)
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	if e.proto != protoWS {
		return map[string]any{"error": "bcast speaks -proto ws only"}
	}
	defer e.closeAll()
	m.e = e
	m.echoPool = newPool(withSession(echoPayload(e.proto)), e.proto)
	// {"type":"broadcast","data":{"message":"xxx...","n":1000000000}}: -bcast-size bytes
	padLen := *flagBcastLen - len(`{"type":"broadcast","data":{"message":"","n":1000000000}}`)
	if padLen < 1 {
		padLen = 1
	}
	m.pad = strings.Repeat("x", padLen)
	m.pool = newPool(withSession(`{"type":"broadcast","data":{"message":"`+m.pad+`","n":%N}}`), e.proto)
	t := nanotime()
	e.add(m.n + 1)
	m.sender = e.conns[m.n]
	total := m.n + 1
	if err := e.runUntil(func() bool { return m.ready == total || m.bad > 0 }, flagTimeout.Nanoseconds()*int64(1+total/2000)); err != nil || m.bad > 0 {
		if err == nil {
			err = errorf("%s", m.why)
		}
		return map[string]any{"error": "connect: " + err.Error(), "connected": e.nopen, "ready": m.ready}
	}
	setup := float64(nanotime()-t) / 1e9

	timeout := flagTimeout.Nanoseconds()
	start := nanotime()
	t0 := start + flagWarmup.Nanoseconds()
	t1 := t0 + flagDuration.Nanoseconds()
	latEnd := int64(0)
	m.maxNext = uint64(*flagR)
	m.sending = true
	m.fill(start)
	var s0, s1 sample
	phase := 0 // 0 warm-up, 1 measured, 2 drain, 3 latency, 4 done
	timedOut := ""
	for phase < 4 {
		e.step(0)
		now := nanotime()
		switch {
		case phase == 0 && now >= t0:
			s0 = takeSample()
			m.counting = true
			event("measure_start")
			phase = 1
		case phase == 1 && (now >= t1 || m.next >= m.maxNext):
			m.counting, m.sending = false, false
			s1 = takeSample()
			event("measure_end")
			m.lowat = 0 // the last broadcasts must wake their receivers alone
			for _, c := range e.conns[:m.n] {
				m.setLowat(c, 0)
			}
			phase = 2
		case phase == 2 && m.open == 0:
			m.latency, m.sending, m.window = true, true, 1
			m.maxNext = m.next + uint64(*flagLat)
			latEnd = now + 10e9
			m.fill(now)
			e.flushDirty()
			phase = 3
		case phase == 3 && (m.open == 0 || now > latEnd):
			if now > latEnd {
				m.sending = false
			}
			if m.open == 0 {
				phase = 4
			}
		}
		if e.nerr > 0 || m.bad > 0 {
			break
		}
		if m.open > 0 {
			oldest := (m.next - uint64(m.open)) % bRing
			if now-m.sentAt[oldest] > timeout {
				timedOut = fmt.Sprintf("broadcast %d reached %d of %d receivers in %v", m.next-uint64(m.open),
					m.count[oldest], m.n, *flagTimeout)
				break
			}
		}
	}
	if phase < 2 {
		s1 = takeSample()
		if phase == 0 {
			s0 = s1
			event("measure_start")
		}
		event("measure_end")
	}
	res := windowResult(s0, s1, e)
	secs := res["secs"].(float64)
	res["receivers"], res["inflight"], res["setup_s"], res["lowat"] = m.n, *flagInflight, setup, *flagLowat
	res["broadcasts"] = m.completedWin
	res["delivered"] = m.deliveries
	res["deliveries_per_s"] = float64(m.deliveries) / secs
	res["last_ms_p50_inflight"] = m.hLast.quantile(0.5) / 1e6
	res["last_ms_p99_inflight"] = m.hLast.quantile(0.99) / 1e6
	res["lat_broadcasts"] = m.completedLat
	res["last_ms_p50"] = m.latLast.quantile(0.5) / 1e6
	res["last_ms_p99"] = m.latLast.quantile(0.99) / 1e6
	res["last_ms_max"] = m.latLast.quantile(1.0) / 1e6
	res["first_ms_p50"] = m.latFirst.quantile(0.5) / 1e6
	res["total_delivered"], res["sender_got"], res["other"], res["slow_checks"] = m.total, m.senderGot, m.other, m.slow
	perMsg(res, m.deliveries, "delivery")
	if d, ok := res["delivery_per_server_cpu_s"]; ok {
		res["deliveries_per_server_cpu_s"] = d
		delete(res, "delivery_per_server_cpu_s")
	}
	finish(res, e, m.bad, 0, m.why)
	if timedOut != "" {
		res["error"] = timedOut
		res["timed_out"] = 1
	} else {
		res["timed_out"] = 0
	}
	return res
}

func errorf(f string, a ...any) error { return fmt.Errorf(f, a...) }
