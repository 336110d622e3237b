package main

// soak: many connections held for minutes, the client side of bench/soak.py
// (docs/benchmarks.md, "50,000 connections held").
//
// -n connections (+1 with -sender) are opened -dial-window at a time, each
// bound to a source address in 127.0.0.0/8 (-src, then the next address every
// -per-src connections: one address has ~28k ephemeral ports). The first
// -members of them send {"type":"subscribe","data":{"room":"b"},"id":1} and
// must get {"type":"reply","data":true,"id":1}. Pings are answered with pongs
// (the engine does it), and tether's heartbeat messages are echoed as its
// clients do (-echo-heartbeat). Then the driver moves the phases with one
// command per line on stdin:
//
//	traffic  every connection sends {"type":"req","data":{"n":N},"id":N} about
//	         every -req-every (first one at a uniform offset, then the interval
//	         +-jitter); the reply must be {"type":"reply","data":N,"id":N}. The
//	         sender sends {"type":"shout","data":{"n":N,"t":T},"id":N} every
//	         -bcast-every (T = 1e15 + its CLOCK_MONOTONIC ns); every member must
//	         get {"type":"tick","data":{"n":N,"t":T},...} once, in order; the
//	         time to all = the last member's receive time - T.
//	drain    no new requests or broadcasts; wait (at most -phase-timeout) for
//	         every reply and every delivery, then EVENT drained
//	close    a close frame (1000) on every connection; each must get the
//	         server's close frame and then EOF (a clean close), at most
//	         -phase-timeout; then RESULT
//
// stdin at EOF means close now. Events: "EVENT ready {json}", "EVENT progress
// {json}" every -progress, "EVENT drained {json}", then "RESULT {json}" (with
// sparse latency histograms, for the driver to merge over several processes).
// Nothing in here stops at the first error: a soak counts what went wrong.
// Every loop is bounded by -lifetime and the phase deadlines.

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

var (
	flagMembers    = flag.Int("members", 0, "soak: the first M connections subscribe to the broadcast room (needs -sender in the same process)")
	flagSender     = flag.Bool("sender", false, "soak: one more connection, which sends a broadcast every -bcast-every")
	flagSrc        = flag.String("src", "127.0.0.2", "soak: first source address (127.0.0.0/8)")
	flagPerSrc     = flag.Int("per-src", 10000, "soak: connections per source address, then the next address")
	flagReqEvery   = flag.Duration("req-every", 30*time.Second, "soak: time between two requests of one connection")
	flagJitter     = flag.Float64("jitter", 0.2, "soak: request interval jitter, a fraction of -req-every (uniform +-)")
	flagBcastEvery = flag.Duration("bcast-every", time.Second, "soak: time between two broadcasts (-sender)")
	flagLifetime   = flag.Duration("lifetime", 20*time.Minute, "soak: the longest run, whatever stdin says")
	flagPhaseTO    = flag.Duration("phase-timeout", 60*time.Second, "soak: drain and close deadlines")
	flagEchoHB     = flag.Bool("echo-heartbeat", true, "soak: echo tether's heartbeat messages, as tether.js and tether.Client do")
	flagProgress   = flag.Duration("progress", time.Second, "soak: EVENT progress interval")
)

const (
	phConnect = iota
	phHold    // all open and subscribed, no traffic: the heartbeat-only window
	phTraffic
	phDrain
	phDrained
	phClose
	phDone
	nPhases
)

var phaseNames = [nPhases]string{"connect", "hold", "traffic", "drain", "drained", "close", "done"}

const (
	ipBindAddressNoPort = 24      // IP_BIND_ADDRESS_NO_PORT: the port is picked at connect(), per 4-tuple
	tBase               = 1e15    // T = tBase + ns: always 16 digits (for 104 days of uptime)
	maxBroadcasts       = 1 << 20 // receivers refuse numbers beyond
)

var (
	hbPrefix   = []byte(`{"type":"heartbeat"`)
	tKey       = []byte(`"t":`)
	subPayload = []byte(`{"type":"subscribe","data":{"room":"b"},"id":1}`)
)

// soakConn: what the soak keeps per connection, beside the engine's conn (same index).
type soakConn struct {
	member, subscribed bool
	closing, gotClose  bool
	closeCode          int
	gotCloseAt         int64
	lastPing           int64 // when the last ping came (the gaps show late keepalive timers)
	sentAt             int64 // the outstanding request's send time; 0: none
	btmpl              tmpl  // a broadcast as the server writes it
}

// dueHeap: a binary min-heap of request times (no interface boxing: no allocation per push).
type dueItem struct {
	at int64
	id int32
}
type dueHeap []dueItem

func (h *dueHeap) push(it dueItem) {
	*h = append(*h, it)
	s := *h
	for i := len(s) - 1; i > 0; {
		p := (i - 1) / 2
		if s[p].at <= s[i].at {
			break
		}
		s[p], s[i] = s[i], s[p]
		i = p
	}
}

func (h *dueHeap) pop() dueItem {
	s := *h
	top := s[0]
	last := len(s) - 1
	s[0] = s[last]
	s = s[:last]
	for i := 0; ; {
		l, r, m := 2*i+1, 2*i+2, i
		if l < len(s) && s[l].at < s[m].at {
			m = l
		}
		if r < len(s) && s[r].at < s[m].at {
			m = r
		}
		if m == i {
			break
		}
		s[m], s[i] = s[i], s[m]
		i = m
	}
	*h = s
	return top
}

type soakMode struct {
	e                    *engine
	st                   []soakConn
	pool                 *framePool
	sender               *conn
	n                    int // connections, the sender not counted
	members              int
	phase                int
	srcBase              uint32
	dueQ                 dueHeap
	rng                  uint64
	t0                   int64
	stdin                []byte
	eof                  bool
	nextDial, window     int
	live, subscribed     int
	phaseAt              [nPhases]int64
	nextShout, deadline  int64
	closeStarted, closed int

	reqSent, reqOK, reqLost, overdue, outstanding int64
	pings                                         [nPhases]int64
	hbEchoed, other, bad                          int64
	why                                           string
	hReq, hPing                                   hist

	bSent, bReplies, bComplete, bOrder int64
	bRecvMin, bRecvMax                 int64
	bCount                             []int32
	bFirst, bLast                      []int64 // ns from T to the first / last member's receive
	hBLast, hBFirst                    hist

	serverClose                                          map[string]int // closes the server started, before the close phase: "code reason"
	lost                                                 map[string]int // connections lost otherwise (EOF, reset) before the close phase
	closeCodes                                           map[int]int    // close phase: the server's close code
	closeNoFrame, closeReset, closeClientFin, closeStuck int
}

func (m *soakMode) rand() uint64 {
	m.rng ^= m.rng >> 12
	m.rng ^= m.rng << 25
	m.rng ^= m.rng >> 27
	return m.rng * 2685821657736338717
}

func (m *soakMode) uniform() float64 { return float64(m.rand()>>11) / float64(1<<53) }

func (m *soakMode) opened(c *conn) {
	m.live++
	st := &m.st[c.id]
	if st.member {
		c.out = appendFrame(c.out, opText, subPayload, c.rand32())
		m.e.queued(c)
	}
}

// message: one data message of an open connection (engine.consume calls it).
func (m *soakMode) message(c *conn, p []byte) {
	st := &m.st[c.id]
	if bytes.HasPrefix(p, hbPrefix) {
		if *flagEchoHB {
			c.out = appendFrame(c.out, opText, p, c.rand32())
			m.e.queued(c)
			m.hbEchoed++
		}
		return
	}
	if st.subscribed {
		if v, ok := st.btmpl.match(p); ok {
			m.tick(c, st, p, v, nil)
			return
		}
	}
	if st.sentAt != 0 {
		if v, ok := c.tmpl.match(p); ok {
			m.replied(c, st, v)
			return
		}
	}
	m.slow(c, st, p)
}

// slow: the full check of a message no template matched (the first of its kind on a connection).
func (m *soakMode) slow(c *conn, st *soakConn, p []byte) {
	var env struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
		ID   json.RawMessage `json:"id"`
	}
	if err := json.Unmarshal(p, &env); err != nil {
		m.fault(fmt.Sprintf("not JSON: %.80q", p))
		return
	}
	switch env.Type {
	case "reply":
		id := string(bytes.TrimSpace(env.ID))
		data := string(bytes.TrimSpace(env.Data))
		switch {
		case c == m.sender:
			m.shoutReply(id, data)
		case st.member && !st.subscribed && id == "1":
			if data != "true" {
				m.fault(fmt.Sprintf("subscribe reply: %.80q", p))
				return
			}
			st.subscribed = true
			m.subscribed++
		default:
			v, ok := checkNumber(env.ID)
			if !ok || data != id || st.sentAt == 0 || v != nBase+c.seqNext-1 {
				m.fault(fmt.Sprintf("reply not in flight: %.80q", p))
				return
			}
			c.tmpl.learn(p, v)
			m.replied(c, st, v)
		}
	case "tick":
		var d struct {
			N json.RawMessage `json:"n"`
			T json.RawMessage `json:"t"`
		}
		if json.Unmarshal(env.Data, &d) != nil || !st.subscribed {
			m.fault(fmt.Sprintf("broadcast: %.100q", p))
			return
		}
		v, ok := checkNumber(d.N)
		t, tok := parseDigits(bytes.TrimSpace(d.T))
		if !ok || !tok {
			m.fault(fmt.Sprintf("broadcast n/t: %.100q", p))
			return
		}
		st.btmpl.learn(p, v)
		m.tick(c, st, p, v, &t)
	case "error":
		m.fault(fmt.Sprintf("error reply: %.120q", p))
	default: // tether's welcome, ...
		m.other++
	}
}

func (m *soakMode) fault(why string) {
	m.bad++
	if m.why == "" {
		m.why = why
	}
}

func (m *soakMode) replied(c *conn, st *soakConn, v uint64) {
	if v != nBase+c.seqNext-1 || st.sentAt == 0 {
		m.fault(fmt.Sprintf("connection %d: reply %d, expected %d", c.id, v-nBase, c.seqNext-1))
		return
	}
	m.hReq[hIdx(nanotime()-st.sentAt)]++
	st.sentAt = 0
	m.reqOK++
	m.outstanding--
}

func (m *soakMode) shoutReply(id, data string) {
	if _, ok := parseDigits([]byte(id)); !ok {
		m.fault("shout reply id: " + id)
		return
	}
	k, err := strconv.ParseInt(data, 10, 64)
	if err != nil {
		m.fault("shout reply: " + data)
		return
	}
	if m.bReplies == 0 || k < m.bRecvMin {
		m.bRecvMin = k
	}
	if k > m.bRecvMax {
		m.bRecvMax = k
	}
	m.bReplies++
}

// tick: a broadcast reached member c. t: its T when the slow path parsed it already.
func (m *soakMode) tick(c *conn, st *soakConn, p []byte, v uint64, t *uint64) {
	now := nanotime()
	i := v - nBase
	if v < nBase || i >= maxBroadcasts {
		m.fault(fmt.Sprintf("broadcast number %d", v))
		return
	}
	if i != c.bnext {
		m.bOrder++ // lost (a gap), doubled or out of order
		if m.why == "" {
			m.why = fmt.Sprintf("member %d got broadcast %d, expected %d", c.id, i, c.bnext)
		}
		if i < c.bnext {
			return
		}
	}
	c.bnext = i + 1
	if t == nil {
		k := bytes.Index(p, tKey)
		if k < 0 || len(p) < k+4+16 {
			m.fault(fmt.Sprintf("broadcast without t: %.100q", p))
			return
		}
		tv, _ := parseDigits(p[k+4 : k+4+16])
		t = &tv
	}
	lat := now - (int64(*t) - tBase)
	for int(i) >= len(m.bCount) { // senders in another process: grow as numbers come
		m.bCount, m.bFirst, m.bLast = append(m.bCount, 0), append(m.bFirst, 0), append(m.bLast, 0)
	}
	m.bCount[i]++
	if m.bCount[i] == 1 {
		m.bFirst[i] = lat
	}
	if lat > m.bLast[i] {
		m.bLast[i] = lat
	}
	if int(m.bCount[i]) == m.members {
		m.hBLast[hIdx(m.bLast[i])]++
		m.hBFirst[hIdx(m.bFirst[i])]++
		m.bComplete++
	}
}

// ---------------------------------------------------------------- dialing from many addresses

func (m *soakMode) kick() {
	e := m.e
	for e.dialing < m.window && m.nextDial < len(e.conns) {
		c := e.conns[m.nextDial]
		m.nextDial++
		m.dial(c)
	}
}

// dial: engine.dial, bound to the connection's source address first.
func (m *soakMode) dial(c *conn) {
	e := m.e
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		e.fail(c, "socket: "+err.Error())
		return
	}
	c.fd, c.state, c.t0 = fd, stDial, nanotime()
	e.dialing++
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	syscall.SetsockoptInt(fd, syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
	src := m.srcBase + uint32(int(c.id) / *flagPerSrc)
	sa := &syscall.SockaddrInet4{Addr: [4]byte{byte(src >> 24), byte(src >> 16), byte(src >> 8), byte(src)}}
	if err := syscall.Bind(fd, sa); err != nil {
		e.fail(c, "bind: "+err.Error())
		return
	}
	if err := syscall.Connect(fd, &e.sa); err != nil && err != syscall.EINPROGRESS {
		e.fail(c, "connect: "+err.Error())
		return
	}
	if err := e.ctl(syscall.EPOLL_CTL_ADD, c, syscall.EPOLLOUT); err != nil {
		e.fail(c, "epoll: "+err.Error())
	}
}

// ---------------------------------------------------------------- the loop

// step: engine.step (blocking), with reads through m.readable: it sees close frames and pings.
func (m *soakMode) step(blockMs int) {
	e := m.e
	e.flushDirty() // what the phase logic queued (requests, broadcasts) leaves before we block
	n := epollWait(e.epfd, e.ev, blockMs)
	if n > 0 {
		e.wakes++
		e.events += int64(n)
	}
	for i := 0; i < n; i++ {
		ev := &e.ev[i]
		c := e.conns[ev.Fd]
		if c.state == stDone {
			continue
		}
		if c.state == stDial {
			e.connected(c)
			continue
		}
		if ev.Events&syscall.EPOLLOUT != 0 {
			e.flush(c)
		}
		if ev.Events&(syscall.EPOLLIN|syscall.EPOLLHUP|syscall.EPOLLERR) != 0 && c.state != stDone {
			m.readable(c)
		}
	}
	e.flushDirty()
}

// frameAt: the frame at the start of b: header and payload lengths, opcode; ok=false if incomplete.
func frameAt(b []byte) (h, n int, op byte, ok bool) {
	if len(b) < 2 {
		return 0, 0, 0, false
	}
	h, n = 2, int(b[1]&0x7f)
	switch n {
	case 126:
		if len(b) < 4 {
			return 0, 0, 0, false
		}
		h, n = 4, int(b[2])<<8|int(b[3])
	case 127:
		if len(b) < 10 {
			return 0, 0, 0, false
		}
		var v uint64
		for _, x := range b[2:10] {
			v = v<<8 | uint64(x)
		}
		if v > maxFrame {
			v = maxFrame + 1 // never complete: the caller's size check fails the connection
		}
		h, n = 10, int(v)
	}
	if b[1]&0x80 != 0 {
		h += 4
	}
	if len(b) < h+n {
		return h, n, 0, false
	}
	return h, n, b[0] & 0x0f, true
}

func closeCode(payload []byte) (int, string) {
	if len(payload) < 2 {
		return 1005, ""
	}
	return int(payload[0])<<8 | int(payload[1]), string(payload[2:])
}

func (m *soakMode) readable(c *conn) {
	e := m.e
	buf := e.rbuf
	n0 := copy(buf, c.partial)
	r, errno := rawRead(c.fd, buf[n0:])
	e.reads++
	if errno == syscall.EAGAIN || errno == syscall.EINTR {
		return
	}
	st := &m.st[c.id]
	if st.closing {
		if r < 0 {
			r = 0
		}
		m.closingRead(c, st, buf[:n0+r], r, errno)
		return
	}
	if errno != 0 {
		m.lose(c, "read: "+errno.Error())
		return
	}
	if r == 0 {
		m.lose(c, "EOF from the server")
		return
	}
	data := buf[:n0+r]
	end, code, reason := len(data), -1, ""
	if c.state == stOpen {
		for off := 0; off < len(data); {
			h, n, op, ok := frameAt(data[off:])
			if !ok {
				break
			}
			if op == opPing {
				m.pings[m.phase]++
				now := nanotime()
				if st.lastPing != 0 {
					m.hPing[hIdx(now-st.lastPing)]++
				}
				st.lastPing = now
			} else if op == opClose {
				end = off
				code, reason = closeCode(data[off+h : off+h+n])
				break
			}
			off += h + n
		}
	}
	used, err := e.consume(c, data[:end])
	if err != nil {
		m.lose(c, err.Error())
		return
	}
	if c.state == stDone {
		return
	}
	if code >= 0 {
		m.serverClose[fmt.Sprintf("%d %s", code, reason)]++
		c.out = appendFrame(c.out[:c.outOff], opClose, []byte{byte(code >> 8), byte(code)}, c.rand32())
		e.flush(c)
		m.lose(c, "server close")
		return
	}
	c.partial = append(c.partial[:0], data[used:]...)
	if len(c.partial) > maxFrame+16 || (c.state < stOpen && len(c.partial) > 16<<10) {
		m.lose(c, "message too large")
		return
	}
	if c.outOff < len(c.out) && !c.pollOut {
		e.flush(c)
	}
}

// lose: a connection ended before the close phase.
func (m *soakMode) lose(c *conn, why string) {
	st := &m.st[c.id]
	if st.sentAt != 0 {
		st.sentAt = 0
		m.outstanding--
		m.reqLost++
	}
	if c.state == stOpen {
		m.live--
	}
	m.lost[why]++
	m.e.fail(c, "lost: "+why)
}

// closingRead: after our close frame: the server's close frame, then EOF.
func (m *soakMode) closingRead(c *conn, st *soakConn, data []byte, r int, errno syscall.Errno) {
	off := 0
	for off < len(data) {
		h, n, op, ok := frameAt(data[off:])
		if !ok {
			break
		}
		if op == opClose && !st.gotClose {
			st.gotClose, st.gotCloseAt = true, nanotime()
			st.closeCode, _ = closeCode(data[off+h : off+h+n])
		}
		off += h + n
	}
	switch {
	case errno != 0:
		m.closeReset++
		m.closeDone(c)
	case r == 0:
		if st.gotClose {
			m.closeCodes[st.closeCode]++
		} else {
			m.closeNoFrame++
		}
		m.closeDone(c)
	default:
		c.partial = append(c.partial[:0], data[off:]...)
		if len(c.partial) > maxFrame+16 {
			m.closeNoFrame++
			m.closeDone(c)
		}
	}
}

func (m *soakMode) closeDone(c *conn) {
	m.e.closeConn(c)
	m.closed++
	m.live--
}

func (m *soakMode) startClose(now int64) {
	e := m.e
	for _, c := range e.conns {
		if c.state != stOpen {
			if c.state != stDone {
				e.fail(c, "not open at the close phase")
			}
			continue
		}
		st := &m.st[c.id]
		st.closing = true
		m.closeStarted++
		c.out = appendFrame(c.out, opClose, []byte{0x03, 0xe8}, c.rand32())
		e.queued(c)
	}
	e.flushDirty()
	m.deadline = now + flagPhaseTO.Nanoseconds()
}

// sweepClose: connections whose server sent its close frame but kept the TCP connection for 2 s
// are closed by us (RFC 6455 7.1.1: the server should close first; the client may after a while);
// at the deadline every connection still there is stuck.
func (m *soakMode) sweepClose(now int64, final bool) {
	for _, c := range m.e.conns {
		if c.state == stDone {
			continue
		}
		st := &m.st[c.id]
		switch {
		case st.gotClose && now-st.gotCloseAt > 2e9:
			m.closeCodes[st.closeCode]++
			m.closeClientFin++
		case final:
			m.closeStuck++
		default:
			continue
		}
		m.closeDone(c)
	}
}

// ---------------------------------------------------------------- traffic

func (m *soakMode) startTraffic(now int64) {
	every := flagReqEvery.Nanoseconds()
	for _, c := range m.e.conns[:m.n] {
		if c.state == stOpen {
			m.dueQ.push(dueItem{now + int64(m.uniform()*float64(every)), c.id})
		}
	}
	m.nextShout = now
}

func (m *soakMode) traffic(now int64) {
	every := float64(flagReqEvery.Nanoseconds())
	for len(m.dueQ) > 0 && m.dueQ[0].at <= now {
		it := m.dueQ.pop()
		c := m.e.conns[it.id]
		if c.state != stOpen {
			continue
		}
		st := &m.st[c.id]
		if st.sentAt != 0 {
			m.overdue++ // the previous request is still unanswered: do not pile up
		} else {
			setDigits(&c.digits, nBase+c.seqNext)
			c.out = m.pool.append(c.out, &c.digits)
			c.seqNext++
			st.sentAt = now
			m.reqSent++
			m.outstanding++
			m.e.queued(c)
		}
		next := every * (1 + *flagJitter*(2*m.uniform()-1))
		m.dueQ.push(dueItem{now + int64(next), it.id})
	}
	if s := m.sender; s != nil && s.state == stOpen && now >= m.nextShout {
		m.shout(now)
		m.nextShout += flagBcastEvery.Nanoseconds()
		if m.nextShout < now { // the loop was late: do not send a burst to catch up
			m.nextShout = now + flagBcastEvery.Nanoseconds()
		}
	}
}

func (m *soakMode) shout(now int64) {
	n := nBase + uint64(m.bSent)
	t := uint64(tBase) + uint64(now)
	p := fmt.Sprintf(`{"type":"shout","data":{"n":%d,"t":%d},"id":%d}`, n, t, n)
	m.sender.out = appendFrame(m.sender.out, opText, []byte(p), m.sender.rand32())
	m.e.queued(m.sender)
	m.bSent++
	for int(m.bSent) > len(m.bCount) {
		m.bCount, m.bFirst, m.bLast = append(m.bCount, 0), append(m.bFirst, 0), append(m.bLast, 0)
	}
}

func (m *soakMode) drained() bool {
	if m.outstanding > 0 {
		return false
	}
	if m.sender != nil && m.sender.state == stOpen && m.bReplies < m.bSent {
		return false
	}
	return m.members == 0 || m.sender == nil || m.bComplete >= m.bSent
}

// ---------------------------------------------------------------- driver commands and reports

func (m *soakMode) readStdin(now int64) {
	if m.eof {
		return
	}
	var b [256]byte
	r, errno := rawRead(0, b[:])
	if errno == syscall.EAGAIN || errno == syscall.EINTR {
		return
	}
	if r <= 0 {
		m.eof = true
		m.command("close", now)
		return
	}
	m.stdin = append(m.stdin, b[:r]...)
	for {
		i := bytes.IndexByte(m.stdin, '\n')
		if i < 0 {
			return
		}
		cmd := strings.TrimSpace(string(m.stdin[:i]))
		m.stdin = m.stdin[i+1:]
		m.command(cmd, now)
	}
}

func (m *soakMode) setPhase(p int, now int64) {
	m.phase = p
	m.phaseAt[p] = now
}

func (m *soakMode) command(cmd string, now int64) {
	switch {
	case cmd == "traffic" && m.phase == phHold:
		m.setPhase(phTraffic, now)
		m.startTraffic(now)
	case cmd == "drain" && (m.phase == phTraffic || m.phase == phHold):
		m.setPhase(phDrain, now)
		m.deadline = now + flagPhaseTO.Nanoseconds()
	case cmd == "close" && m.phase < phClose:
		m.setPhase(phClose, now)
		m.startClose(now)
	case cmd == "close":
	default:
		fmt.Fprintf(os.Stderr, "soak: command %q ignored in phase %s\n", cmd, phaseNames[m.phase])
	}
}

func (m *soakMode) emit(name string, v map[string]any) {
	b, _ := json.Marshal(v)
	event(name + " " + string(b))
}

func (m *soakMode) counts(now int64) map[string]any {
	return map[string]any{
		"t": float64(now-m.t0) / 1e9, "phase": phaseNames[m.phase], "open": m.live, "subscribed": m.subscribed,
		"req_sent": m.reqSent, "req_ok": m.reqOK, "outstanding": m.outstanding, "overdue": m.overdue,
		"bcast_sent": m.bSent, "bcast_complete": m.bComplete, "pings": sum(m.pings[:]),
		"errors": m.e.nerr, "bad": m.bad, "closed": m.closed,
	}
}

func sum(v []int64) int64 {
	var s int64
	for _, x := range v {
		s += x
	}
	return s
}

func sparse(h *hist) map[string]uint64 {
	out := map[string]uint64{}
	for i, c := range h {
		if c > 0 {
			out[strconv.Itoa(i)] = c
		}
	}
	return out
}

func ms(ns float64) float64 { return ns / 1e6 }

func (m *soakMode) result(now int64, setup float64) map[string]any {
	e := m.e
	pings := map[string]int64{}
	for p, v := range m.pings {
		if v > 0 {
			pings[phaseNames[p]] = v
		}
	}
	secs := map[string]float64{}
	for p := phHold; p < nPhases; p++ {
		if m.phaseAt[p] > 0 && m.phaseAt[p-1] > 0 {
			secs[phaseNames[p-1]] = float64(m.phaseAt[p]-m.phaseAt[p-1]) / 1e9
		}
	}
	codes := map[string]int{}
	for k, v := range m.closeCodes {
		codes[strconv.Itoa(k)] = v
	}
	bLastUs := make([]int64, len(m.bLast))
	for i, v := range m.bLast {
		bLastUs[i] = v / 1e3
	}
	res := map[string]any{
		"connections": m.n, "members": m.members, "sender": m.sender != nil, "setup_s": setup,
		"phase_s": secs, "final_phase": phaseNames[m.phase],
		"subscribed": m.subscribed, "opened": e.nopen,
		"req_sent": m.reqSent, "req_ok": m.reqOK, "req_lost": m.reqLost, "req_unanswered": m.outstanding,
		"overdue":    m.overdue,
		"req_p50_ms": ms(m.hReq.quantile(0.5)), "req_p99_ms": ms(m.hReq.quantile(0.99)),
		"req_max_ms": ms(m.hReq.quantile(1)), "req_hist": sparse(&m.hReq),
		"bcast_sent": m.bSent, "bcast_replies": m.bReplies, "bcast_complete": m.bComplete,
		"bcast_order_errors": m.bOrder, "bcast_receivers_min": m.bRecvMin, "bcast_receivers_max": m.bRecvMax,
		"bcast_last_ms_p50": ms(m.hBLast.quantile(0.5)), "bcast_last_ms_p99": ms(m.hBLast.quantile(0.99)),
		"bcast_last_ms_max": ms(m.hBLast.quantile(1)), "bcast_first_ms_p50": ms(m.hBFirst.quantile(0.5)),
		"bcast_count": m.bCount, "bcast_last_us": bLastUs, "bcast_hist": sparse(&m.hBLast),
		"pings": pings, "ping_gap_s_p50": m.hPing.quantile(0.5) / 1e9, "ping_gap_s_p99": m.hPing.quantile(0.99) / 1e9,
		"ping_gap_s_max": m.hPing.quantile(1) / 1e9, "ping_gap_hist": sparse(&m.hPing), "heartbeats_echoed": m.hbEchoed, "other": m.other, "bad": m.bad,
		"server_closed": m.serverClose, "lost": m.lost,
		"close_started": m.closeStarted, "close_codes": codes, "close_no_frame": m.closeNoFrame,
		"close_reset": m.closeReset, "close_client_fin": m.closeClientFin, "close_stuck": m.closeStuck,
		"gen_cpu_s": cpuSelf().Seconds(), "secs": float64(now-m.t0) / 1e9,
	}
	if m.why != "" {
		res["why"] = m.why
	}
	finish(res, e, 0, 0, "")
	delete(res, "error") // a soak reports what went wrong; the driver judges
	return res
}

func runSoak() map[string]any {
	m := &soakMode{n: *flagN, members: *flagMembers, window: *flagDialWindow, serverClose: map[string]int{},
		lost: map[string]int{}, closeCodes: map[int]int{}, rng: uint64(time.Now().UnixNano()) | 1}
	ip := net.ParseIP(*flagSrc).To4()
	if ip == nil || ip[0] != 127 {
		return map[string]any{"error": "-src must be an address in 127.0.0.0/8"}
	}
	m.srcBase = uint32(ip[0])<<24 | uint32(ip[1])<<16 | uint32(ip[2])<<8 | uint32(ip[3])
	if last := m.srcBase + uint32((m.n+1) / *flagPerSrc); last>>24 != 127 || last&0xff == 0xff {
		return map[string]any{"error": "source addresses run out of 127.0.0.0/8 (or hit a .255)"}
	}
	if m.members > m.n || (m.members > 0 && !*flagSender) {
		return map[string]any{"error": "-members must be <= -n, and needs -sender (time to all is measured in one process)"}
	}
	e, err := newEngine(*flagAddr, *flagPath, *flagProto, m)
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	if e.proto != protoWS {
		return map[string]any{"error": "soak speaks -proto ws only"}
	}
	m.e = e
	e.tick, e.window = 0, 0 // block in epoll_wait; m.kick dials, from the bound source addresses
	m.pool = newPool(`{"type":"req","data":{"n":%N},"id":%N}`, e.proto)
	e.add(m.n)
	if *flagSender {
		e.add(1)
		m.sender = e.conns[m.n]
	}
	m.st = make([]soakConn, len(e.conns))
	for i := 0; i < m.members; i++ {
		m.st[i].member = true
	}
	syscall.SetNonblock(0, true)
	m.t0 = nanotime()
	m.setPhase(phConnect, m.t0)
	total := len(e.conns)
	connectBy := m.t0 + flagTimeout.Nanoseconds()*int64(1+total/2000)
	end := m.t0 + flagLifetime.Nanoseconds()
	nextProgress := m.t0
	lastSweep := int64(0)
	setup := 0.0
	for m.phase != phDone {
		now := nanotime()
		if now > end {
			fmt.Fprintln(os.Stderr, "soak: -lifetime reached")
			if m.phase < phClose {
				m.command("close", now)
			} else {
				m.sweepClose(now, true)
				m.setPhase(phDone, now)
			}
		}
		m.readStdin(now)
		switch m.phase {
		case phConnect:
			m.kick()
			if m.live+m.closed == total && m.subscribed == m.members {
				setup = float64(now-m.t0) / 1e9
				m.setPhase(phHold, now)
				r := m.counts(now)
				r["setup_s"] = setup
				m.emit("ready", r)
			} else if now > connectBy || m.nextDial == total && e.dialing == 0 && m.live < total {
				r := m.counts(now)
				r["error"] = fmt.Sprintf("%d of %d connections open, %d of %d subscribed: %v", m.live, total,
					m.subscribed, m.members, e.errs)
				m.emit("failed", r)
				m.command("close", now)
			}
		case phTraffic:
			m.traffic(now)
		case phDrain:
			if m.drained() || now > m.deadline {
				m.setPhase(phDrained, now)
				m.emit("drained", m.counts(now))
			}
		case phClose:
			if m.closed >= m.closeStarted {
				m.setPhase(phDone, now)
				continue
			}
			if now-lastSweep > 250e6 || now > m.deadline {
				lastSweep = now
				m.sweepClose(now, now > m.deadline)
			}
		}
		if now >= nextProgress {
			m.emit("progress", m.counts(now))
			nextProgress = now + flagProgress.Nanoseconds()
		}
		wait := nextProgress - now
		if m.phase == phTraffic {
			if len(m.dueQ) > 0 && m.dueQ[0].at-now < wait {
				wait = m.dueQ[0].at - now
			}
			if m.sender != nil && m.nextShout-now < wait {
				wait = m.nextShout - now
			}
		}
		block := int(wait / 1e6)
		if block < 1 {
			block = 1
		}
		if block > 20 {
			block = 20 // stdin is polled between waits
		}
		m.step(block)
	}
	for _, c := range e.conns {
		e.closeConn(c)
	}
	syscall.Close(e.epfd)
	return m.result(nanotime(), setup)
}
