package main

// idle: N connections, one echo round trip each, then held (pings answered)
// until stdin closes or -hold passes. The runner measures the server's RSS.

type idleMode struct {
	e     *engine
	pool  *framePool
	ready int
	other int64
	bad   int64
	why   string
}

// setupEcho sends request nBase on a freshly opened connection.
func setupEcho(e *engine, pool *framePool, c *conn) {
	setDigits(&c.digits, nBase)
	c.out = pool.appendSession(c.out, &c.digits, c.next(), c.lastSeq)
	e.queued(c)
}

// setupReply: the reply to setupEcho? (true once; other messages are skipped)
func setupReply(c *conn, p []byte, proto int, other, bad *int64, why *string) bool {
	if *flagSession {
		c.seen(p, false)
	}
	v, vd, w := checkEcho(p, proto)
	switch {
	case vd == vOther:
		*other++
	case vd == vBad:
		*bad++
		*why = w
	case v != nBase:
		*bad++
		*why = "setup reply with a number that was not sent"
	default:
		c.ready = true
		return true
	}
	return false
}

func (m *idleMode) opened(c *conn) { setupEcho(m.e, m.pool, c) }

func (m *idleMode) message(c *conn, p []byte) {
	if c.ready {
		m.other++
		return
	}
	if setupReply(c, p, m.e.proto, &m.other, &m.bad, &m.why) {
		m.ready++
	}
}

func runIdle() map[string]any {
	m := &idleMode{}
	e, err := newEngine(*flagAddr, *flagPath, *flagProto, m)
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	defer e.closeAll()
	m.e = e
	m.pool = newPool(withSession(echoPayload(e.proto)), e.proto)
	t := nanotime()
	e.add(*flagN)
	if err := e.runUntil(func() bool { return m.ready == *flagN || m.bad > 0 }, flagTimeout.Nanoseconds()); err != nil || m.bad > 0 {
		if err == nil {
			err = errorf("%s", m.why)
		}
		return map[string]any{"error": "connect: " + err.Error(), "connected": e.nopen, "ready": m.ready}
	}
	setup := float64(nanotime()-t) / 1e9
	event("holding")
	piped := e.watchStdin()
	deadline := nanotime() + flagHold.Nanoseconds()
	for nanotime() < deadline && !e.stdinEOF && e.nerr == 0 {
		e.step(50)
	}
	res := map[string]any{"connections": m.ready, "setup_s": setup, "stdin_watched": piped, "other": m.other}
	finish(res, e, m.bad, 0, m.why)
	return res
}
