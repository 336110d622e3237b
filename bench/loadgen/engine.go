package main

// The engine: one OS thread, one epoll set, raw non-blocking sockets, no
// goroutine per connection. Every connection is a small state machine
// (connect -> HTTP upgrade -> [Engine.IO open -> Socket.IO connect] -> open)
// driven by level-triggered epoll; a mode (echo, idle, bcast) gets each
// complete message, in place in the shared read buffer.
//
// Costs per round trip are kept to one read(2) and one write(2) per
// connection and wake-up (all replies that arrived together are answered by
// one write), raw syscalls (no runtime entersyscall/exitsyscall, so the Go
// scheduler's sysmon never hands the P off and wakes other threads), no
// allocation after warm-up, and a polling tick (see step) instead of a
// sleep/wake-up per reply: on this 2-vCPU VM one sleep + wake-up costs ~5 us
// of CPU, as much as the rest of a round trip.

import (
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"
	"unsafe"
)

//go:linkname nanotime runtime.nanotime
func nanotime() int64

const (
	protoWS = iota
	protoSIO
	protoTCP
)

const (
	stIdle = iota // not dialed yet
	stDial
	stHandshake
	stSioOpen    // waiting for the Engine.IO open packet
	stSioConnect // sent "40", waiting for the Socket.IO connect
	stOpen
	stDone
)

const (
	opCont  = 0x0
	opText  = 0x1
	opBin   = 0x2
	opClose = 0x8
	opPing  = 0x9
	opPong  = 0xA

	maxFrame   = 64 << 10 // larger server frames are an error
	rbufSize   = 256 << 10
	stdinID    = -1
	epollBatch = 1024
)

var crlfcrlf = []byte("\r\n\r\n")

type conn struct {
	fd      int
	id      int32
	state   uint8
	pollOut bool // EPOLLOUT registered (a write was short)
	dirty   bool // on the engine's flush list
	inFrag  bool
	ready   bool  // the mode's setup (one echo round trip) is done
	t0      int64 // dial start
	key     string
	partial []byte // bytes of an incomplete frame, carried to the next read
	out     []byte
	outOff  int
	frag    []byte
	rng     uint64

	// echo: requests seqAcked..seqNext-1 are in flight; ring[seq&ringMask] is the
	// send time of seq, or -1 once its reply came
	seqNext, seqAcked uint64
	ring              []int64
	ringMask          uint64
	digits            [nDigits]byte // the number of request seqNext, in ASCII
	tmpl              tmpl          // a reply as this server writes it, learned from the first checked one

	bnext uint64 // bcast receivers: the broadcast expected next

	lastSeq uint64 // -session: the seq of the last numbered message received (acked by the next request)
	reqSeq  uint64 // -session: the seq of the last request sent
}

// rand32: xorshift64*, for the few frames not taken from a pool (pong, control).
func (c *conn) rand32() uint32 {
	c.rng ^= c.rng >> 12
	c.rng ^= c.rng << 25
	c.rng ^= c.rng >> 27
	return uint32((c.rng * 2685821657736338717) >> 32)
}

// handler is a mode: it sees connections open and gets their messages.
type handler interface {
	opened(c *conn)
	message(c *conn, p []byte) // a complete data message; p is valid during the call only
}

type engine struct {
	epfd     int
	sa       syscall.SockaddrInet4
	addr     string
	path     string
	proto    int
	conns    []*conn
	ev       []syscall.EpollEvent
	rbuf     []byte
	h        handler
	dirty    []*conn
	errs     map[string]int
	nerr     int
	dialing  int // connections between connect() and open
	window   int
	nextDial int
	nopen    int
	stdinEOF bool
	wakes    int64 // epoll_wait calls that returned events
	sleeps   int64
	events   int64
	reads    int64
	writes   int64
	tick     int64 // ns; 0 = block in epoll_wait instead
}

func newEngine(addr, path, proto string, h handler) (*engine, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	ip := net.ParseIP(host).To4()
	if host == "localhost" {
		ip = net.IPv4(127, 0, 0, 1).To4()
	}
	if ip == nil || !ip.IsLoopback() {
		return nil, errors.New("-addr must be 127.0.0.1:<port>")
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, err
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	e := &engine{epfd: epfd, addr: addr, path: path, h: h, errs: map[string]int{},
		ev: make([]syscall.EpollEvent, epollBatch), rbuf: make([]byte, rbufSize), window: *flagDialWindow}
	copy(e.sa.Addr[:], ip)
	e.sa.Port = p
	switch proto {
	case "ws":
		e.proto = protoWS
	case "sio":
		e.proto = protoSIO
		e.path = "/socket.io/?EIO=4&transport=websocket"
	case "tcp":
		e.proto = protoTCP
	default:
		return nil, fmt.Errorf("unknown -proto %q", proto)
	}
	if *flagWait == "tick" {
		e.tick = flagTick.Nanoseconds()
	}
	return e, nil
}

// add creates n connections; they are dialed -dial-window at a time as the loop runs.
func (e *engine) add(n int) []*conn {
	first := len(e.conns)
	var seed [8]byte
	for i := 0; i < n; i++ {
		rand.Read(seed[:])
		c := &conn{fd: -1, id: int32(len(e.conns)), rng: leU64(seed[:]) | 1}
		e.conns = append(e.conns, c)
	}
	e.kick()
	return e.conns[first:]
}

func leU64(b []byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func (e *engine) kick() {
	for e.dialing < e.window && e.nextDial < len(e.conns) {
		c := e.conns[e.nextDial]
		e.nextDial++
		e.dial(c)
	}
}

func (e *engine) ctl(op int, c *conn, events uint32) error {
	ev := syscall.EpollEvent{Events: events, Fd: c.id}
	return syscall.EpollCtl(e.epfd, op, c.fd, &ev)
}

func (e *engine) dial(c *conn) {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		e.fail(c, "socket: "+err.Error())
		return
	}
	c.fd, c.state, c.t0 = fd, stDial, nanotime()
	e.dialing++
	syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	if err := syscall.Connect(fd, &e.sa); err != nil && err != syscall.EINPROGRESS {
		e.fail(c, "connect: "+err.Error())
		return
	}
	if err := e.ctl(syscall.EPOLL_CTL_ADD, c, syscall.EPOLLOUT); err != nil {
		e.fail(c, "epoll: "+err.Error())
	}
}

func (e *engine) connected(c *conn) {
	if v, err := syscall.GetsockoptInt(c.fd, syscall.SOL_SOCKET, syscall.SO_ERROR); err != nil || v != 0 {
		if err == nil {
			err = syscall.Errno(v)
		}
		e.fail(c, "connect: "+err.Error())
		return
	}
	if err := e.ctl(syscall.EPOLL_CTL_MOD, c, syscall.EPOLLIN); err != nil {
		e.fail(c, "epoll: "+err.Error())
		return
	}
	if e.proto == protoTCP {
		e.open(c)
		return
	}
	var k [16]byte
	rand.Read(k[:])
	c.key = base64.StdEncoding.EncodeToString(k[:])
	req := "GET " + e.path + " HTTP/1.1\r\nHost: " + e.addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Origin: http://" + e.addr + "\r\nSec-WebSocket-Key: " + c.key + "\r\nSec-WebSocket-Version: 13\r\n"
	if *flagSession {
		req += sessionOffer
	}
	req += "\r\n"
	c.state = stHandshake
	c.out = append(c.out, req...)
	e.flush(c)
}

func (e *engine) open(c *conn) {
	c.state = stOpen
	e.dialing--
	e.nopen++
	e.kick()
	e.h.opened(c)
}

func (e *engine) fail(c *conn, why string) {
	if c.state == stDone {
		return
	}
	if c.state != stOpen && c.state != stIdle {
		e.dialing--
	}
	e.nerr++
	e.errs[why]++
	e.closeConn(c)
	e.kick()
}

func (e *engine) closeConn(c *conn) {
	if c.fd >= 0 {
		syscall.Close(c.fd) // also leaves the epoll set
		c.fd = -1
	}
	c.state = stDone
}

// closeAll ends every connection: a close frame (1000) where one can be written, then close(2).
func (e *engine) closeAll() {
	for _, c := range e.conns {
		if c.state == stOpen && e.proto != protoTCP && !c.pollOut {
			c.out = appendFrame(c.out[:0], opClose, []byte{0x03, 0xe8}, c.rand32())
			c.outOff = 0
			rawWrite(c.fd, c.out)
		}
		e.closeConn(c)
	}
	syscall.Close(e.epfd)
}

// watchStdin adds fd 0 to the set: idle mode holds until it is closed.
func (e *engine) watchStdin() bool {
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: stdinID}
	return syscall.EpollCtl(e.epfd, syscall.EPOLL_CTL_ADD, 0, &ev) == nil
}

// ---------------------------------------------------------------- raw syscalls

func rawRead(fd int, p []byte) (int, syscall.Errno) {
	r, _, e := syscall.RawSyscall(syscall.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(r), e
}

func rawWrite(fd int, p []byte) (int, syscall.Errno) {
	r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	return int(r), e
}

func epollWait(epfd int, ev []syscall.EpollEvent, msec int) int {
	r, _, e := syscall.RawSyscall6(syscall.SYS_EPOLL_WAIT, uintptr(epfd), uintptr(unsafe.Pointer(&ev[0])),
		uintptr(len(ev)), uintptr(msec), 0, 0)
	if e != 0 {
		return 0 // EINTR (the runtime's preemption signal): the caller just polls again
	}
	return int(r)
}

var sleepTS syscall.Timespec

func nanosleep(ns int64) {
	sleepTS = syscall.NsecToTimespec(ns)
	syscall.RawSyscall(syscall.SYS_NANOSLEEP, uintptr(unsafe.Pointer(&sleepTS)), 0, 0)
}

// ---------------------------------------------------------------- the loop

// step waits for events once and handles them. With a tick (the default), an
// empty poll sleeps one tick and polls again: replies that arrive during the
// tick are handled together, and the server never pays for waking this
// process (nobody waits on the socket). blockMs > 0 (nothing expected soon,
// e.g. idle connections) or -wait=block: epoll_wait blocks, as a server does.
func (e *engine) step(blockMs int) int {
	var n int
	if e.tick > 0 && blockMs <= 0 {
		n = epollWait(e.epfd, e.ev, 0)
		if n == 0 {
			e.sleeps++
			nanosleep(e.tick)
			n = epollWait(e.epfd, e.ev, 0)
		}
	} else {
		if blockMs <= 0 {
			blockMs = 2
		}
		n = epollWait(e.epfd, e.ev, blockMs)
	}
	if n > 0 {
		e.wakes++
		e.events += int64(n)
	}
	for i := 0; i < n; i++ {
		ev := &e.ev[i]
		if ev.Fd == stdinID {
			var b [512]byte
			if r, errno := rawRead(0, b[:]); r <= 0 && errno != syscall.EAGAIN && errno != syscall.EINTR {
				e.stdinEOF = true
				syscall.EpollCtl(e.epfd, syscall.EPOLL_CTL_DEL, 0, nil)
			}
			continue
		}
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
			e.readable(c)
		}
	}
	e.flushDirty()
	return n
}

func (e *engine) flushDirty() {
	for _, c := range e.dirty {
		c.dirty = false
		if c.state != stDone && !c.pollOut {
			e.flush(c)
		}
	}
	e.dirty = e.dirty[:0]
}

func (e *engine) readable(c *conn) {
	buf := e.rbuf
	n0 := copy(buf, c.partial)
	r, errno := rawRead(c.fd, buf[n0:])
	e.reads++
	if errno == syscall.EAGAIN || errno == syscall.EINTR {
		return
	}
	if errno != 0 {
		e.fail(c, "read: "+errno.Error())
		return
	}
	if r == 0 {
		e.fail(c, "server closed the connection (EOF)")
		return
	}
	data := buf[:n0+r]
	used, err := e.consume(c, data)
	if err != nil {
		e.fail(c, err.Error())
		return
	}
	if c.state == stDone {
		return
	}
	c.partial = append(c.partial[:0], data[used:]...)
	if len(c.partial) > maxFrame+16 || (c.state < stOpen && len(c.partial) > 16<<10) {
		e.fail(c, "message too large")
		return
	}
	if c.outOff < len(c.out) && !c.pollOut {
		e.flush(c)
	}
}

// queued marks c for a write at the end of this step (a mode wrote to c.out).
func (e *engine) queued(c *conn) {
	if !c.dirty {
		c.dirty = true
		e.dirty = append(e.dirty, c)
	}
}

func (e *engine) flush(c *conn) {
	for c.outOff < len(c.out) {
		w, errno := rawWrite(c.fd, c.out[c.outOff:])
		e.writes++
		if errno == syscall.EINTR {
			continue
		}
		if errno == syscall.EAGAIN {
			if !c.pollOut {
				c.pollOut = true
				e.ctl(syscall.EPOLL_CTL_MOD, c, syscall.EPOLLIN|syscall.EPOLLOUT)
			}
			return
		}
		if errno != 0 {
			e.fail(c, "write: "+errno.Error())
			return
		}
		c.outOff += w
	}
	c.out, c.outOff = c.out[:0], 0
	if c.pollOut {
		c.pollOut = false
		e.ctl(syscall.EPOLL_CTL_MOD, c, syscall.EPOLLIN)
	}
}

// consume handles the bytes read so far: the handshake response, then frames
// (or lines for -proto tcp). Returns how many bytes were used.
func (e *engine) consume(c *conn, b []byte) (int, error) {
	off := 0
	if c.state == stHandshake {
		i := bytes.Index(b, crlfcrlf)
		if i < 0 {
			return 0, nil
		}
		if err := checkUpgrade(b[:i], c.key); err != nil {
			return 0, err
		}
		off = i + 4
		c.key = ""
		if e.proto == protoSIO {
			c.state = stSioOpen
		} else {
			e.open(c)
		}
	}
	if e.proto == protoTCP {
		for {
			i := bytes.IndexByte(b[off:], '\n')
			if i < 0 {
				return off, nil
			}
			e.h.message(c, b[off:off+i])
			off += i + 1
			if c.state == stDone {
				return off, nil
			}
		}
	}
	for {
		r := b[off:]
		if len(r) < 2 {
			return off, nil
		}
		b0, b1 := r[0], r[1]
		if b1&0x80 != 0 {
			return off, errors.New("masked server frame")
		}
		if b0&0x70 != 0 {
			return off, errors.New("RSV bits set (no extension was negotiated)")
		}
		h, n := 2, int(b1&0x7f)
		if n == 126 {
			if len(r) < 4 {
				return off, nil
			}
			h, n = 4, int(r[2])<<8|int(r[3])
		} else if n == 127 {
			if len(r) < 10 {
				return off, nil
			}
			var v uint64
			for _, x := range r[2:10] {
				v = v<<8 | uint64(x)
			}
			if v > maxFrame {
				return off, errors.New("frame too large")
			}
			h, n = 10, int(v)
		}
		if n > maxFrame {
			return off, errors.New("frame too large")
		}
		if len(r) < h+n {
			return off, nil
		}
		p := r[h : h+n]
		off += h + n
		fin := b0&0x80 != 0
		switch op := b0 & 0x0f; op {
		case opText, opBin:
			if c.inFrag {
				return off, errors.New("data frame inside a fragmented message")
			}
			if fin {
				e.text(c, p)
			} else {
				c.frag, c.inFrag = append(c.frag[:0], p...), true
			}
		case opCont:
			if !c.inFrag {
				return off, errors.New("continuation without a message")
			}
			if len(c.frag)+len(p) > maxFrame {
				return off, errors.New("fragmented message too large")
			}
			c.frag = append(c.frag, p...)
			if fin {
				c.inFrag = false
				e.text(c, c.frag)
			}
		case opPing:
			c.out = appendFrame(c.out, opPong, p, c.rand32())
			e.queued(c)
		case opPong:
		case opClose:
			return off, errors.New("server closed the connection (close frame)")
		default:
			return off, fmt.Errorf("unknown opcode %d", op)
		}
		if c.state == stDone {
			return off, nil
		}
	}
}

var (
	sioPing    = []byte("2")
	sioConnect = []byte("40")
)

// text: Engine.IO / Socket.IO setup and heartbeats, then the mode's messages.
func (e *engine) text(c *conn, p []byte) {
	if e.proto == protoSIO {
		if len(p) == 1 && p[0] == '2' { // Engine.IO ping: pong
			c.out = appendFrame(c.out, opText, []byte("3"), c.rand32())
			e.queued(c)
			return
		}
		switch c.state {
		case stSioOpen:
			if len(p) == 0 || p[0] != '0' {
				e.fail(c, fmt.Sprintf("engine.io open: %.60q", p))
				return
			}
			c.out = appendFrame(c.out, opText, sioConnect, c.rand32())
			c.state = stSioConnect
			e.queued(c)
			return
		case stSioConnect:
			if bytes.HasPrefix(p, sioConnect) {
				e.open(c)
			}
			return
		}
	}
	if c.state == stOpen {
		e.h.message(c, p)
	}
}

func checkUpgrade(head []byte, key string) error {
	lines := bytes.Split(head, []byte("\r\n"))
	if f := bytes.Fields(lines[0]); len(f) < 2 || string(f[1]) != "101" {
		return fmt.Errorf("handshake: %.80q", lines[0])
	}
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	want := base64.StdEncoding.EncodeToString(h[:])
	for _, l := range lines[1:] {
		i := bytes.IndexByte(l, ':')
		if i < 0 {
			continue
		}
		name := string(bytes.ToLower(bytes.TrimSpace(l[:i])))
		val := string(bytes.TrimSpace(l[i+1:]))
		switch name {
		case "sec-websocket-accept":
			if val != want {
				return errors.New("handshake: bad Sec-WebSocket-Accept")
			}
			want = ""
		case "sec-websocket-extensions":
			return fmt.Errorf("handshake: extension %q was not offered", val)
		}
	}
	if want != "" {
		return errors.New("handshake: no Sec-WebSocket-Accept")
	}
	return nil
}

// setupDone: every connection is open (and ready, for modes with a setup
// round trip), or one failed, or the timeout passed.
func (e *engine) runUntil(done func() bool, timeoutNs int64) error {
	deadline := nanotime() + timeoutNs
	for !done() {
		if e.nerr > 0 {
			return e.firstErr()
		}
		if nanotime() > deadline {
			return fmt.Errorf("timed out (%d of %d connections open)", e.nopen, len(e.conns))
		}
		e.step(1)
	}
	return nil
}

func (e *engine) firstErr() error {
	for k, v := range e.errs {
		return fmt.Errorf("%s (x%d)", k, v)
	}
	return nil
}
