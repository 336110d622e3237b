package main

// echo: C connections, K requests in flight on each. A connection answers
// every checked reply with a new request; all requests a connection owes after
// one read leave in one write (K at once at the start).

import "time"

type echoMode struct {
	e        *engine
	pool     *framePool
	k        int
	max      uint64
	sending  bool
	counting bool
	inflight int64
	msgs     int64
	other    int64
	bad      int64
	mismatch int64
	slow     int64
	why      string
	h        hist
}

func (m *echoMode) opened(c *conn) {
	size := 1
	for size < 2*m.k {
		size <<= 1
	}
	c.ring = make([]int64, size)
	c.ringMask = uint64(size - 1)
	setDigits(&c.digits, nBase)
}

func (m *echoMode) send(c *conn, now int64) {
	c.out = m.pool.appendSession(c.out, &c.digits, c.next(), c.lastSeq)
	incDigits(&c.digits)
	c.ring[c.seqNext&c.ringMask] = now
	c.seqNext++
	m.inflight++
	m.e.queued(c)
}

// reply checks p and returns the sequence number it answers (ok=false: not a
// reply to us, counted).
func (m *echoMode) reply(c *conn, p []byte) (uint64, bool) {
	v, fast := c.tmpl.match(p)
	if *flagSession {
		c.seen(p, fast)
	}
	if !fast {
		var vd verdict
		var why string
		v, vd, why = checkEcho(p, m.e.proto)
		switch vd {
		case vOther:
			m.other++
			return 0, false
		case vBad:
			m.bad++
			m.why = why
			return 0, false
		}
		m.slow++
	}
	seq := v - nBase
	if v < nBase || seq < c.seqAcked || seq >= c.seqNext || c.ring[seq&c.ringMask] < 0 {
		m.mismatch++
		return 0, false
	}
	if !fast {
		c.tmpl.learn(p, v)
	}
	return seq, true
}

func (m *echoMode) message(c *conn, p []byte) {
	seq, ok := m.reply(c, p)
	if !ok {
		return
	}
	now := nanotime()
	slot := seq & c.ringMask
	sent := c.ring[slot]
	c.ring[slot] = -1
	m.inflight--
	if m.counting {
		m.msgs++
		m.h[hIdx(now-sent)]++
	}
	for c.seqAcked < c.seqNext && c.ring[c.seqAcked&c.ringMask] < 0 {
		c.seqAcked++
	}
	if m.sending && c.seqNext < m.max && c.seqNext-c.seqAcked < uint64(len(c.ring)) {
		m.send(c, now)
	}
}

func runEcho() map[string]any {
	m := &echoMode{k: *flagK, max: uint64(*flagMax)}
	if m.k < 1 || m.k > 4096 {
		return map[string]any{"error": "-k must be 1..4096"}
	}
	e, err := newEngine(*flagAddr, *flagPath, *flagProto, m)
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	defer e.closeAll()
	m.e = e
	m.pool = newPool(withSession(echoPayload(e.proto)), e.proto)
	e.add(*flagC)
	if err := e.runUntil(func() bool { return e.nopen == *flagC }, flagTimeout.Nanoseconds()); err != nil {
		return map[string]any{"error": "connect: " + err.Error(), "connected": e.nopen}
	}
	start := nanotime()
	t0 := start + flagWarmup.Nanoseconds()
	t1 := t0 + flagDuration.Nanoseconds()
	hard := t1 + (10 * time.Second).Nanoseconds()
	m.sending = true
	for _, c := range e.conns {
		for i := 0; i < m.k; i++ {
			m.send(c, start)
		}
	}
	e.flushDirty() // K requests per connection, one write each
	var s0, s1 sample
	phase := 0
	timedOut := false
	for {
		e.step(0)
		now := nanotime()
		if phase == 0 && now >= t0 {
			s0 = takeSample()
			m.counting = true
			event("measure_start")
			phase = 1
		} else if phase == 1 && (now >= t1 || e.nerr > 0 || m.bad > 0) {
			m.counting, m.sending = false, false
			s1 = takeSample()
			event("measure_end")
			phase = 2
		}
		if phase == 2 && (m.inflight == 0 || e.nerr > 0 || m.bad > 0) {
			break
		}
		if now > hard {
			timedOut = true
			break
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
	res["msgs"] = m.msgs
	res["rps"] = float64(m.msgs) / secs
	res["p50_us"] = m.h.quantile(0.50) / 1e3
	res["p99_us"] = m.h.quantile(0.99) / 1e3
	res["other"], res["bad"], res["mismatched"], res["slow_checks"] = m.other, m.bad, m.mismatch, m.slow
	perMsg(res, m.msgs, "rt")
	if timedOut {
		e.errs["timeout waiting for replies"]++
		e.nerr++
	}
	finish(res, e, m.bad, m.mismatch, m.why)
	return res
}
