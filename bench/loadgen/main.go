// tether-loadgen: a minimal load generator for tether's benchmark suite.
//
// It speaks RFC 6455 itself (client handshake, masked framing, unmasked server
// frames, ping -> pong), Engine.IO v4 / Socket.IO v5 over WebSocket (event with
// ack), and raw TCP with newline framing. Every loop is bounded in time
// (-warmup + -duration, plus hard socket deadlines) and in count (-max).
//
// Modes:
//
//	echo   C connections, K messages in flight each: round trips/s, p50/p99
//	idle   open N connections (one echo round trip each), print HOLDING, wait
//	       for stdin to close (or -hold), then close them
//	bcast  N receivers + 1 sender; R broadcasts, each waits for all receivers
//
// Output: "EVENT measure_start" / "EVENT measure_end" / "EVENT holding" lines
// as things happen, then one "RESULT {json}" line. CPU used by this process
// during the measurement window is reported (gen_cpu_frac of one core).
//
// Build: GO111MODULE=off go build -o bench/.build/loadgen ./bench/loadgen
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/bits"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var (
	flagMode     = flag.String("mode", "echo", "echo | idle | bcast")
	flagProto    = flag.String("proto", "ws", "ws | sio | tcp")
	flagAddr     = flag.String("addr", "127.0.0.1:9100", "server host:port (127.0.0.1 only)")
	flagPath     = flag.String("path", "/", "WebSocket path")
	flagC        = flag.Int("c", 50, "connections (echo)")
	flagK        = flag.Int("k", 1, "messages in flight per connection (echo)")
	flagN        = flag.Int("n", 1000, "connections (idle) / receivers (bcast)")
	flagR        = flag.Int("r", 20, "broadcasts (bcast)")
	flagWarmup   = flag.Duration("warmup", time.Second, "warmup before measuring (echo)")
	flagDuration = flag.Duration("duration", 3*time.Second, "measurement window (echo)")
	flagMax      = flag.Int64("max", 5_000_000, "max messages per connection (echo)")
	flagHold     = flag.Duration("hold", 30*time.Second, "max time to hold idle connections")
	flagTimeout  = flag.Duration("timeout", 20*time.Second, "connect / per-broadcast timeout")
	flagEngine   = flag.String("engine", "epoll", "echo engine: epoll (one thread) | goroutine (one per connection)")
	flagBcastLen = flag.Int("bcast-size", 100, "approximate broadcast message size in bytes")
)

const (
	opCont  = 0x0
	opText  = 0x1
	opBin   = 0x2
	opClose = 0x8
	opPing  = 0x9
	opPong  = 0xA
)

var thanks = []byte("Thanks for the message!")

// ---------------------------------------------------------------- histogram

// log-linear histogram of nanoseconds, ~1.5% resolution
const histSize = 128 + 64*58

type hist [histSize]uint64

func hIdx(v int64) int {
	if v < 0 {
		v = 0
	}
	if v < 128 {
		return int(v)
	}
	e := bits.Len64(uint64(v)) - 7
	m := uint64(v) >> uint(e)
	return 128 + (e-1)*64 + int(m-64)
}

func hVal(i int) float64 {
	if i < 128 {
		return float64(i)
	}
	e := (i-128)/64 + 1
	m := (i-128)%64 + 64
	return (float64(m) + 0.5) * float64(uint64(1)<<uint(e))
}

func (h *hist) add(o *hist) {
	for i := range h {
		h[i] += o[i]
	}
}

func (h *hist) quantile(q float64) float64 {
	var total uint64
	for _, c := range h {
		total += c
	}
	if total == 0 {
		return 0
	}
	target := uint64(q*float64(total-1)) + 1
	var acc uint64
	for i, c := range h {
		acc += c
		if acc >= target {
			return hVal(i)
		}
	}
	return 0
}

// ---------------------------------------------------------------- CPU

func cpuNow() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var outMu sync.Mutex

func event(name string) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, "EVENT %s\n", name)
	outMu.Unlock()
}

// ---------------------------------------------------------------- client conn

type conn struct {
	nc    net.Conn
	r     *bufio.Reader
	proto string
	rng   uint64
	wbuf  []byte
	rbuf  []byte // frame payload (valid until next read)
	frag  []byte
	other int64 // frames that were not echo replies (welcome, heartbeat, ...)
}

func (c *conn) rand32() uint32 {
	// xorshift64*: cheap per-frame masking keys
	c.rng ^= c.rng >> 12
	c.rng ^= c.rng << 25
	c.rng ^= c.rng >> 27
	return uint32((c.rng * 2685821657736338717) >> 32)
}

func dial(addr, path, proto string) (*conn, error) {
	nc, err := net.DialTimeout("tcp", addr, *flagTimeout)
	if err != nil {
		return nil, err
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	var seed [8]byte
	rand.Read(seed[:])
	c := &conn{nc: nc, r: bufio.NewReaderSize(nc, 32768), proto: proto, rng: uint64(seed[0]) | uint64(seed[1])<<8 | uint64(seed[2])<<16 | uint64(seed[3])<<24 | uint64(seed[4])<<32 | uint64(seed[5])<<40 | uint64(seed[6])<<48 | uint64(seed[7])<<56 | 1}
	if proto == "tcp" {
		return c, nil
	}
	nc.SetDeadline(time.Now().Add(*flagTimeout))
	defer nc.SetDeadline(time.Time{})
	if proto == "sio" {
		path = "/socket.io/?EIO=4&transport=websocket"
	}
	var key [16]byte
	rand.Read(key[:])
	k := base64.StdEncoding.EncodeToString(key[:])
	req := "GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Origin: http://" + addr + "\r\nSec-WebSocket-Key: " + k + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
	if _, err := nc.Write([]byte(req)); err != nil {
		nc.Close()
		return nil, err
	}
	status, err := c.r.ReadString('\n')
	if err != nil {
		nc.Close()
		return nil, err
	}
	if !strings.Contains(status, " 101") {
		nc.Close()
		return nil, fmt.Errorf("handshake: %q", strings.TrimSpace(status))
	}
	h := sha1.Sum([]byte(k + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	want := base64.StdEncoding.EncodeToString(h[:])
	gotAccept := false
	for {
		line, err := c.r.ReadString('\n')
		if err != nil {
			nc.Close()
			return nil, err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			break
		}
		if i := strings.IndexByte(line, ':'); i > 0 && strings.EqualFold(line[:i], "Sec-WebSocket-Accept") {
			gotAccept = strings.TrimSpace(line[i+1:]) == want
		}
	}
	if !gotAccept {
		nc.Close()
		return nil, errors.New("handshake: bad Sec-WebSocket-Accept")
	}
	if proto == "sio" {
		// Engine.IO open packet "0{...}", then Socket.IO connect to "/"
		op, p, err := c.readFrame()
		if err != nil || op != opText || len(p) == 0 || p[0] != '0' {
			nc.Close()
			return nil, fmt.Errorf("engine.io open: %v %q", err, p)
		}
		c.wbuf = appendFrame(c.wbuf[:0], opText, []byte("40"), c.rand32())
		if _, err := nc.Write(c.wbuf); err != nil {
			nc.Close()
			return nil, err
		}
		for {
			op, p, err = c.readFrame()
			if err != nil {
				nc.Close()
				return nil, err
			}
			if op == opText && len(p) >= 2 && p[0] == '4' && p[1] == '0' {
				break
			}
		}
	}
	return c, nil
}

func appendFrame(dst []byte, op byte, payload []byte, key uint32) []byte {
	n := len(payload)
	dst = append(dst, 0x80|op)
	switch {
	case n < 126:
		dst = append(dst, 0x80|byte(n))
	case n < 65536:
		dst = append(dst, 0x80|126, byte(n>>8), byte(n))
	default:
		dst = append(dst, 0x80|127, 0, 0, 0, 0, byte(n>>24), byte(n>>16), byte(n>>8), byte(n))
	}
	mk := [4]byte{byte(key >> 24), byte(key >> 16), byte(key >> 8), byte(key)}
	dst = append(dst, mk[:]...)
	start := len(dst)
	dst = append(dst, payload...)
	for i := 0; i < n; i++ {
		dst[start+i] ^= mk[i&3]
	}
	return dst
}

// readFrame returns one complete message (continuations joined); ping is
// answered with pong, pong ignored. The payload is valid until the next call.
func (c *conn) readFrame() (byte, []byte, error) {
	if c.proto == "tcp" {
		line, err := c.r.ReadSlice('\n')
		if err != nil {
			return 0, nil, err
		}
		return opText, line[:len(line)-1], nil
	}
	c.frag = c.frag[:0]
	var msgOp byte
	for {
		var hdr [2]byte
		if _, err := io.ReadFull(c.r, hdr[:]); err != nil {
			return 0, nil, err
		}
		fin := hdr[0]&0x80 != 0
		op := hdr[0] & 0x0f
		if hdr[1]&0x80 != 0 {
			return 0, nil, errors.New("masked server frame")
		}
		n := uint64(hdr[1] & 0x7f)
		if n == 126 {
			var b [2]byte
			if _, err := io.ReadFull(c.r, b[:]); err != nil {
				return 0, nil, err
			}
			n = uint64(b[0])<<8 | uint64(b[1])
		} else if n == 127 {
			var b [8]byte
			if _, err := io.ReadFull(c.r, b[:]); err != nil {
				return 0, nil, err
			}
			n = 0
			for _, x := range b {
				n = n<<8 | uint64(x)
			}
		}
		if n > 64<<20 {
			return 0, nil, errors.New("frame too large")
		}
		if uint64(cap(c.rbuf)) < n {
			c.rbuf = make([]byte, n)
		}
		p := c.rbuf[:n]
		if _, err := io.ReadFull(c.r, p); err != nil {
			return 0, nil, err
		}
		switch op {
		case opPing:
			c.wbuf = appendFrame(c.wbuf[:0], opPong, p, c.rand32())
			if _, err := c.nc.Write(c.wbuf); err != nil {
				return 0, nil, err
			}
			continue
		case opPong:
			continue
		case opClose:
			return opClose, p, errors.New("server closed the connection")
		}
		if op != opCont {
			msgOp = op
		}
		if fin && len(c.frag) == 0 {
			return msgOp, p, nil
		}
		c.frag = append(c.frag, p...)
		if fin {
			return msgOp, c.frag, nil
		}
	}
}

// appendMsg appends one echo request (framed for the protocol) for counter n.
func (c *conn) appendMsg(dst []byte, n int64) []byte {
	var tmp [128]byte
	p := tmp[:0]
	switch c.proto {
	case "sio":
		p = append(p, "42"...)
		p = strconv.AppendInt(p, n, 10)
		p = append(p, `["echo",{"message":"hello server!","n":`...)
		p = strconv.AppendInt(p, n, 10)
		p = append(p, "}]"...)
	default:
		p = append(p, `{"type":"echo","data":{"message":"hello server!","n":`...)
		p = strconv.AppendInt(p, n, 10)
		p = append(p, "}}"...)
	}
	if c.proto == "tcp" {
		dst = append(dst, p...)
		return append(dst, '\n')
	}
	return appendFrame(dst, opText, p, c.rand32())
}

var nKey = []byte(`"n":`)

// replyN extracts n from an echo reply; ok=false for other messages.
func replyN(p []byte) (int64, bool) {
	if !bytes.Contains(p, thanks) {
		return 0, false
	}
	i := bytes.LastIndex(p, nKey)
	if i < 0 {
		return 0, false
	}
	i += len(nKey)
	for i < len(p) && p[i] == ' ' {
		i++
	}
	var v int64
	j := i
	for j < len(p) && p[j] >= '0' && p[j] <= '9' {
		v = v*10 + int64(p[j]-'0')
		j++
	}
	return v, j > i
}

// roundTrip sends one message and waits for its reply (skipping welcome etc.).
func (c *conn) roundTrip(n int64) error {
	c.wbuf = c.appendMsg(c.wbuf[:0], n)
	if _, err := c.nc.Write(c.wbuf); err != nil {
		return err
	}
	for {
		op, p, err := c.readFrame()
		if err != nil {
			return err
		}
		if op == opText {
			if v, ok := replyN(p); ok {
				if v != n {
					return fmt.Errorf("reply n=%d, want %d", v, n)
				}
				return nil
			}
		}
		c.other++
	}
}

// ---------------------------------------------------------------- echo mode

const slots = 4096

type echoStats struct {
	msgs, errors, other, mismatched int64
	h                               hist
	err                             string
}

func echoConn(c *conn, k int, t0, t1 time.Time, st *echoStats) {
	defer c.nc.Close()
	c.nc.SetDeadline(t1.Add(10 * time.Second))
	var sent [slots]int64
	var sentN [slots]int64
	var next int64 = 1
	send := func(count int, now int64) error {
		c.wbuf = c.wbuf[:0]
		for i := 0; i < count; i++ {
			c.wbuf = c.appendMsg(c.wbuf, next)
			sent[next%slots] = now
			sentN[next%slots] = next
			next++
		}
		_, err := c.nc.Write(c.wbuf)
		return err
	}
	t0n, t1n := t0.UnixNano(), t1.UnixNano()
	if err := send(k, time.Now().UnixNano()); err != nil {
		st.errors++
		st.err = err.Error()
		return
	}
	inflight := k
	owed := 0
	stopping := false
	for inflight > 0 {
		op, p, err := c.readFrame()
		if err != nil {
			st.errors++
			st.err = err.Error()
			return
		}
		now := time.Now().UnixNano()
		if op != opText {
			st.other++
			continue
		}
		v, ok := replyN(p)
		if !ok {
			st.other++
			continue
		}
		if sentN[v%slots] != v {
			st.mismatched++
			continue
		}
		inflight--
		if now >= t0n && now < t1n {
			st.msgs++
			st.h[hIdx(now-sent[v%slots])]++
		}
		if now >= t1n || next > *flagMax {
			stopping = true
		}
		if !stopping {
			owed++
		}
		// replies that arrived together are answered with one write
		if owed > 0 && (c.r.Buffered() == 0 || inflight == 0) {
			if err := send(owed, now); err != nil {
				st.errors++
				st.err = err.Error()
				return
			}
			inflight += owed
			owed = 0
		}
	}
}

func runEcho() map[string]any {
	conns := make([]*conn, 0, *flagC)
	var connErr error
	for i := 0; i < *flagC; i++ {
		c, err := dial(*flagAddr, *flagPath, *flagProto)
		if err != nil {
			connErr = err
			break
		}
		conns = append(conns, c)
	}
	if connErr != nil {
		for _, c := range conns {
			c.nc.Close()
		}
		return map[string]any{"error": "connect: " + connErr.Error(), "connected": len(conns)}
	}
	start := time.Now()
	t0 := start.Add(*flagWarmup)
	t1 := t0.Add(*flagDuration)
	stats := make([]echoStats, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c *conn) {
			defer wg.Done()
			echoConn(c, *flagK, t0, t1, &stats[i])
		}(i, c)
	}
	time.Sleep(time.Until(t0))
	cpu0 := cpuNow()
	event("measure_start")
	time.Sleep(time.Until(t1))
	cpu1 := cpuNow()
	wall := time.Since(t0)
	event("measure_end")
	wg.Wait()
	var total echoStats
	errs := map[string]int{}
	for i := range stats {
		s := &stats[i]
		total.msgs += s.msgs
		total.errors += s.errors
		total.other += s.other
		total.mismatched += s.mismatched
		total.h.add(&s.h)
		if s.err != "" {
			errs[s.err]++
		}
	}
	secs := t1.Sub(t0).Seconds()
	res := map[string]any{
		"msgs": total.msgs, "secs": secs, "rps": float64(total.msgs) / secs,
		"p50_us": total.h.quantile(0.50) / 1e3, "p99_us": total.h.quantile(0.99) / 1e3,
		"errors": total.errors, "other": total.other, "mismatched": total.mismatched,
		"gen_cpu_s": (cpu1 - cpu0).Seconds(), "gen_cpu_frac": (cpu1 - cpu0).Seconds() / wall.Seconds(),
	}
	if len(errs) > 0 {
		res["error_kinds"] = errs
	}
	return res
}

// ---------------------------------------------------------------- idle mode

func dialMany(n int) ([]*conn, error) {
	conns := make([]*conn, n)
	errc := make(chan error, n)
	sem := make(chan struct{}, 64)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dial(*flagAddr, *flagPath, *flagProto)
			if err == nil {
				c.nc.SetDeadline(time.Now().Add(*flagTimeout))
				err = c.roundTrip(1)
				c.nc.SetDeadline(time.Time{})
			}
			if err != nil {
				if c != nil {
					c.nc.Close()
				}
				errc <- err
				return
			}
			conns[i] = c
		}(i)
	}
	wg.Wait()
	close(errc)
	err := <-errc
	if err != nil {
		for _, c := range conns {
			if c != nil {
				c.nc.Close()
			}
		}
		return nil, err
	}
	return conns, nil
}

func runIdle() map[string]any {
	t := time.Now()
	conns, err := dialMany(*flagN)
	if err != nil {
		return map[string]any{"error": "connect: " + err.Error()}
	}
	setup := time.Since(t).Seconds()
	event("holding")
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	select {
	case <-done:
	case <-time.After(*flagHold):
	}
	for _, c := range conns {
		c.nc.Close()
	}
	return map[string]any{"connections": len(conns), "setup_s": setup}
}

// ---------------------------------------------------------------- bcast mode

func runBcast() map[string]any {
	n, r := *flagN, *flagR
	receivers, err := dialMany(n)
	if err != nil {
		return map[string]any{"error": "connect receivers: " + err.Error()}
	}
	sender, err := dial(*flagAddr, *flagPath, *flagProto)
	if err == nil {
		err = sender.roundTrip(1)
	}
	if err != nil {
		for _, c := range receivers {
			c.nc.Close()
		}
		return map[string]any{"error": "connect sender: " + err.Error()}
	}
	counts := make([]int32, r)
	done := make([]chan int64, r)
	for i := range done {
		done[i] = make(chan int64, 1)
	}
	var bad int64
	hardStop := time.Now().Add(time.Duration(r)**flagTimeout + 10*time.Second)
	var wg sync.WaitGroup
	for _, c := range receivers {
		wg.Add(1)
		go func(c *conn) {
			defer wg.Done()
			c.nc.SetDeadline(hardStop)
			got := 0
			for got < r {
				op, p, err := c.readFrame()
				if err != nil {
					return
				}
				if op != opText {
					continue
				}
				i := bytes.LastIndex(p, nKey)
				if i < 0 || !bytes.Contains(p, []byte(`"broadcast"`)) {
					continue
				}
				digits := bytes.TrimLeft(p[i+len(nKey):], " ")
				end := 0
				for end < len(digits) && digits[end] >= '0' && digits[end] <= '9' {
					end++
				}
				v, err := strconv.ParseInt(string(digits[:end]), 10, 64) // fields may follow "n" (tether adds "room")
				if err != nil {
					v = -1
				}
				if v < 0 || v >= int64(r) {
					atomic.AddInt64(&bad, 1)
					continue
				}
				got++
				if atomic.AddInt32(&counts[v], 1) == int32(n) {
					done[v] <- time.Now().UnixNano()
				}
			}
		}(c)
	}
	go func() { // the sender may get its own broadcast back: drain it
		sender.nc.SetDeadline(hardStop)
		for {
			if _, _, err := sender.readFrame(); err != nil {
				return
			}
		}
	}()
	padLen := *flagBcastLen - 60
	if padLen < 0 {
		padLen = 0
	}
	pad := strings.Repeat("x", padLen)
	var h hist
	var lasts []float64
	delivered := int64(0)
	cpu0 := cpuNow()
	event("measure_start")
	tStart := time.Now()
	timedOut := 0
	for i := 0; i < r; i++ {
		msg := fmt.Sprintf(`{"type":"broadcast","data":{"message":"%s","n":%d}}`, pad, i)
		buf := appendFrame(nil, opText, []byte(msg), sender.rand32())
		ts := time.Now().UnixNano()
		if _, err := sender.nc.Write(buf); err != nil {
			return map[string]any{"error": "send: " + err.Error()}
		}
		select {
		case te := <-done[i]:
			h[hIdx(te-ts)]++
			lasts = append(lasts, float64(te-ts)/1e6)
			delivered += int64(n)
		case <-time.After(*flagTimeout):
			timedOut++
			delivered += int64(atomic.LoadInt32(&counts[i]))
		}
		if timedOut > 0 {
			break
		}
	}
	elapsed := time.Since(tStart)
	cpu1 := cpuNow()
	event("measure_end")
	for _, c := range receivers {
		c.nc.Close()
	}
	sender.nc.Close()
	wg.Wait()
	res := map[string]any{
		"receivers": n, "broadcasts": r, "delivered": delivered, "secs": elapsed.Seconds(),
		"deliveries_per_s": float64(delivered) / elapsed.Seconds(),
		"last_ms_p50":      h.quantile(0.5) / 1e6, "last_ms_max": h.quantile(1.0) / 1e6,
		"timed_out": timedOut, "bad": bad,
		"gen_cpu_s": (cpu1 - cpu0).Seconds(), "gen_cpu_frac": (cpu1 - cpu0).Seconds() / elapsed.Seconds(),
	}
	if timedOut > 0 {
		res["error"] = fmt.Sprintf("broadcast timed out: %d/%d receivers", atomic.LoadInt32(&counts[len(lasts)]), n)
	}
	return res
}

func main() {
	flag.Parse()
	host, _, err := net.SplitHostPort(*flagAddr)
	if err != nil || (host != "127.0.0.1" && host != "localhost") {
		fmt.Fprintln(os.Stderr, "loadgen: -addr must be 127.0.0.1:<port>")
		os.Exit(2)
	}
	var res map[string]any
	switch *flagMode {
	case "echo":
		if *flagEngine == "goroutine" {
			res = runEcho()
		} else {
			res = runEchoEpoll()
		}
	case "idle":
		res = runIdle()
	case "bcast":
		res = runBcast()
	default:
		fmt.Fprintln(os.Stderr, "loadgen: unknown -mode")
		os.Exit(2)
	}
	res["mode"], res["proto"] = *flagMode, *flagProto
	res["c"], res["k"], res["n"] = *flagC, *flagK, *flagN
	b, _ := json.Marshal(res)
	outMu.Lock()
	fmt.Printf("RESULT %s\n", b)
	outMu.Unlock()
	if _, bad := res["error"]; bad {
		os.Exit(1)
	}
}
