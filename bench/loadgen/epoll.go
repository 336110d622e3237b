package main

// The echo engine: one OS thread, one epoll set, non-blocking sockets.
// Per round trip it costs one read and one write (fewer when replies arrive
// together): much less CPU than a goroutine per connection.

import (
	"bytes"
	"errors"
	"net"
	"runtime"
	"syscall"
	"time"
)

type econn struct {
	*conn
	fd       int
	buf      []byte
	n        int // bytes in buf
	out      []byte
	sent     [slots]int64
	sentN    [slots]int64
	next     int64
	inflight int
	done     bool
}

func detach(c *conn) (*econn, error) {
	tc, ok := c.nc.(*net.TCPConn)
	if !ok {
		return nil, errors.New("not TCP")
	}
	f, err := tc.File() // a dup, in blocking mode
	if err != nil {
		return nil, err
	}
	fd, err := syscall.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		return nil, err
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		return nil, err
	}
	e := &econn{conn: c, fd: fd, buf: make([]byte, 65536), next: 1}
	// bytes the handshake reader already pulled in (e.g. a welcome message)
	if b := c.r.Buffered(); b > 0 {
		p, _ := c.r.Peek(b)
		e.n = copy(e.buf, p)
	}
	c.nc.Close()
	return e, nil
}

func (e *econn) queue(count int, now int64) {
	for i := 0; i < count; i++ {
		e.out = e.appendMsg(e.out, e.next)
		e.sent[e.next%slots] = now
		e.sentN[e.next%slots] = e.next
		e.next++
	}
	e.inflight += count
}

func (e *econn) flush() error {
	for len(e.out) > 0 {
		w, err := syscall.Write(e.fd, e.out)
		if err == syscall.EAGAIN || err == syscall.EINTR {
			runtime.Gosched()
			continue
		}
		if err != nil {
			return err
		}
		e.out = e.out[w:]
	}
	e.out = e.out[:0]
	return nil
}

// frames parses complete messages from e.buf[:e.n], calling fn for each text
// message; pings are answered. Returns the number of bytes consumed.
func (e *econn) frames(fn func(p []byte)) (int, error) {
	b := e.buf[:e.n]
	off := 0
	if e.proto == "tcp" {
		for {
			i := bytes.IndexByte(b[off:], '\n')
			if i < 0 {
				return off, nil
			}
			fn(b[off : off+i])
			off += i + 1
		}
	}
	for {
		r := b[off:]
		if len(r) < 2 {
			return off, nil
		}
		fin := r[0]&0x80 != 0
		op := r[0] & 0x0f
		if r[1]&0x80 != 0 {
			return off, errors.New("masked server frame")
		}
		h, n := 2, uint64(r[1]&0x7f)
		if n == 126 {
			if len(r) < 4 {
				return off, nil
			}
			h, n = 4, uint64(r[2])<<8|uint64(r[3])
		} else if n == 127 {
			if len(r) < 10 {
				return off, nil
			}
			h, n = 10, 0
			for _, x := range r[2:10] {
				n = n<<8 | uint64(x)
			}
		}
		if n > uint64(len(e.buf)/2) {
			return off, errors.New("frame too large for the echo engine")
		}
		if uint64(len(r)) < uint64(h)+n {
			return off, nil
		}
		p := r[h : uint64(h)+n]
		off += h + int(n)
		switch op {
		case opPing:
			e.out = appendFrame(e.out, opPong, p, e.rand32())
		case opPong:
		case opClose:
			return off, errors.New("server closed the connection")
		case opText, opBin:
			if fin {
				fn(p)
			} else {
				e.frag = append(e.frag[:0], p...)
			}
		case opCont:
			e.frag = append(e.frag, p...)
			if fin {
				fn(e.frag)
			}
		}
	}
}

func runEchoEpoll() map[string]any {
	runtime.LockOSThread()
	conns := make([]*econn, 0, *flagC)
	fail := func(err error) map[string]any {
		for _, e := range conns {
			syscall.Close(e.fd)
		}
		return map[string]any{"error": "connect: " + err.Error(), "connected": len(conns)}
	}
	epfd, err := syscall.EpollCreate1(0)
	if err != nil {
		return fail(err)
	}
	defer syscall.Close(epfd)
	byFd := map[int]*econn{}
	for i := 0; i < *flagC; i++ {
		c, err := dial(*flagAddr, *flagPath, *flagProto)
		if err != nil {
			return fail(err)
		}
		e, err := detach(c)
		if err != nil {
			return fail(err)
		}
		conns = append(conns, e)
		byFd[e.fd] = e
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(e.fd)}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, e.fd, &ev); err != nil {
			return fail(err)
		}
	}
	start := time.Now()
	t0 := start.Add(*flagWarmup)
	t1 := t0.Add(*flagDuration)
	hard := t1.Add(10 * time.Second)
	t0n, t1n := t0.UnixNano(), t1.UnixNano()
	var st echoStats
	errs := map[string]int{}
	now := start.UnixNano()
	for _, e := range conns {
		e.queue(*flagK, now)
		if err := e.flush(); err != nil {
			return fail(err)
		}
	}
	var cpu0, cpu1 time.Duration
	var wall0, wall1 time.Time
	phase := 0
	active := len(conns)
	events := make([]syscall.EpollEvent, 256)
	var cur *econn
	onMsg := func(p []byte) {
		v, ok := replyN(p)
		if !ok {
			st.other++
			return
		}
		e := cur
		if e.sentN[v%slots] != v {
			st.mismatched++
			return
		}
		e.inflight--
		if now >= t0n && now < t1n {
			st.msgs++
			st.h[hIdx(now-e.sent[v%slots])]++
		}
		if now < t1n && e.next <= *flagMax {
			e.queue(1, now)
		}
	}
	for active > 0 {
		nev, err := syscall.EpollWait(epfd, events, 5)
		tn := time.Now()
		now = tn.UnixNano()
		if phase == 0 && now >= t0n {
			cpu0, wall0, phase = cpuNow(), tn, 1
			event("measure_start")
		}
		if phase == 1 && now >= t1n {
			cpu1, wall1, phase = cpuNow(), tn, 2
			event("measure_end")
		}
		if tn.After(hard) {
			for _, e := range conns {
				if !e.done {
					st.errors++
					errs["timeout waiting for replies"]++
				}
			}
			break
		}
		if err != nil && err != syscall.EINTR {
			errs["epoll: "+err.Error()]++
			break
		}
		for i := 0; i < nev; i++ {
			e := byFd[int(events[i].Fd)]
			if e == nil || e.done {
				continue
			}
			r, err := syscall.Read(e.fd, e.buf[e.n:])
			if err == syscall.EAGAIN || err == syscall.EINTR {
				continue
			}
			if err == nil && r == 0 {
				err = errors.New("EOF")
			}
			if err == nil {
				e.n += r
				cur = e
				var used int
				used, err = e.frames(onMsg)
				copy(e.buf, e.buf[used:e.n])
				e.n -= used
			}
			if err == nil {
				err = e.flush()
			}
			if err != nil || e.inflight == 0 {
				if err != nil {
					st.errors++
					errs[err.Error()]++
				}
				e.done = true
				active--
				syscall.EpollCtl(epfd, syscall.EPOLL_CTL_DEL, e.fd, nil)
				syscall.Close(e.fd)
			}
		}
	}
	for _, e := range conns {
		if !e.done {
			syscall.Close(e.fd)
		}
	}
	if phase < 2 {
		cpu1, wall1 = cpuNow(), time.Now()
		if phase == 0 {
			cpu0, wall0 = cpu1, wall1
			event("measure_start")
		}
		event("measure_end")
	}
	secs := t1.Sub(t0).Seconds()
	wall := wall1.Sub(wall0).Seconds()
	if wall <= 0 {
		wall = secs
	}
	res := map[string]any{
		"msgs": st.msgs, "secs": secs, "rps": float64(st.msgs) / secs,
		"p50_us": st.h.quantile(0.50) / 1e3, "p99_us": st.h.quantile(0.99) / 1e3,
		"errors": st.errors, "other": st.other, "mismatched": st.mismatched,
		"gen_cpu_s": (cpu1 - cpu0).Seconds(), "gen_cpu_frac": (cpu1 - cpu0).Seconds() / wall,
		"engine": "epoll",
	}
	if len(errs) > 0 {
		res["error_kinds"] = errs
	}
	return res
}
