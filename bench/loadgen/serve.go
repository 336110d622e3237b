package main

// serve: a trivial WebSocket echo server, the floor of what a server can cost
// on this machine: one thread, epoll, one read and one write per wake-up of a
// connection, no JSON (the reply is a canned string with the request's n copied
// in). The generator's self-test runs against it; bench/run.py lists it as the
// "floor" peer.

import (
	"bytes"
	"crypto/sha1"
	"encoding/base64"
	"fmt"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"
)

type sconn struct {
	fd      int
	open    bool
	partial []byte
	out     []byte
}

var (
	replyHead = []byte(`{"type":"echo","data":{"message":"Thanks for the message!","n":`)
	replyTail = []byte(`}}`)
	nKey      = []byte(`"n":`)
	wsKeyHdr  = []byte("sec-websocket-key:")
)

func runServe() int {
	lifetime := 10 * time.Minute
	flag := false
	visitFlags(func(name string) { flag = flag || name == "hold" })
	if flag {
		lifetime = *flagHold
	}
	host, port, _ := net.SplitHostPort(*flagAddr)
	ip := net.ParseIP(host).To4()
	if host == "localhost" {
		ip = net.IPv4(127, 0, 0, 1).To4()
	}
	p, _ := strconv.Atoi(port)
	if ip == nil || !ip.IsLoopback() {
		fmt.Fprintln(os.Stderr, "serve: -addr must be 127.0.0.1:<port>")
		return 2
	}
	ln, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "serve:", err)
		return 1
	}
	syscall.SetsockoptInt(ln, syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1)
	sa := &syscall.SockaddrInet4{Port: p}
	copy(sa.Addr[:], ip)
	if err := syscall.Bind(ln, sa); err != nil {
		fmt.Fprintln(os.Stderr, "serve: bind:", err)
		return 1
	}
	if err := syscall.Listen(ln, 4096); err != nil {
		fmt.Fprintln(os.Stderr, "serve: listen:", err)
		return 1
	}
	if got, err := syscall.Getsockname(ln); err == nil {
		p = got.(*syscall.SockaddrInet4).Port
	}
	epfd, _ := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, ln, &syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: -1})
	fmt.Printf("EVENT listening %d\n", p)
	conns := map[int32]*sconn{}
	ev := make([]syscall.EpollEvent, 512)
	buf := make([]byte, 256<<10)
	deadline := nanotime() + lifetime.Nanoseconds()
	for nanotime() < deadline {
		n := epollWait(epfd, ev, 200)
		for i := 0; i < n; i++ {
			if ev[i].Fd == -1 {
				for {
					fd, _, err := syscall.Accept4(ln, syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC)
					if err != nil {
						break
					}
					syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
					conns[int32(fd)] = &sconn{fd: fd}
					syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fd, &syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(fd)})
				}
				continue
			}
			c := conns[ev[i].Fd]
			if c == nil {
				continue
			}
			if !serveRead(c, buf) {
				syscall.Close(c.fd)
				delete(conns, ev[i].Fd)
			}
		}
	}
	return 0
}

// serveRead: one read, every complete frame answered, one write. false = close.
func serveRead(c *sconn, buf []byte) bool {
	n0 := copy(buf, c.partial)
	r, errno := rawRead(c.fd, buf[n0:])
	if errno == syscall.EAGAIN || errno == syscall.EINTR {
		return true
	}
	if errno != 0 || r == 0 {
		return false
	}
	b := buf[:n0+r]
	off := 0
	c.out = c.out[:0]
	if !c.open {
		i := bytes.Index(b, crlfcrlf)
		if i < 0 {
			c.partial = append(c.partial[:0], b...)
			return len(b) < 16<<10
		}
		key := ""
		for _, l := range bytes.Split(b[:i], []byte("\r\n")) {
			if bytes.HasPrefix(bytes.ToLower(l), wsKeyHdr) {
				key = string(bytes.TrimSpace(l[len(wsKeyHdr):]))
			}
		}
		if key == "" {
			return false
		}
		h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
		c.out = append(c.out, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "...)
		c.out = append(c.out, base64.StdEncoding.EncodeToString(h[:])...)
		c.out = append(c.out, "\r\n\r\n"...)
		c.open = true
		off = i + 4
	}
	for {
		f := b[off:]
		if len(f) < 6 {
			break
		}
		if f[1]&0x80 == 0 {
			return false // clients must mask
		}
		h, ln := 6, int(f[1]&0x7f)
		if ln == 126 {
			if len(f) < 8 {
				break
			}
			h, ln = 8, int(f[2])<<8|int(f[3])
		} else if ln == 127 {
			return false
		}
		if len(f) < h+ln {
			break
		}
		mk := f[h-4 : h]
		p := f[h : h+ln]
		for j := range p {
			p[j] ^= mk[j&3]
		}
		off += h + ln
		switch f[0] & 0x0f {
		case opText:
			i := bytes.Index(p, nKey)
			if i < 0 {
				continue
			}
			d := p[i+len(nKey):]
			for len(d) > 0 && d[0] == ' ' {
				d = d[1:]
			}
			e := 0
			for e < len(d) && d[e] >= '0' && d[e] <= '9' {
				e++
			}
			size := len(replyHead) + e + len(replyTail)
			c.out = append(c.out, 0x81, byte(size))
			c.out = append(c.out, replyHead...)
			c.out = append(c.out, d[:e]...)
			c.out = append(c.out, replyTail...)
		case opPing:
			c.out = append(c.out, 0x8A, byte(len(p)))
			c.out = append(c.out, p...)
		case opClose:
			c.out = append(c.out, 0x88, 0)
			rawWrite(c.fd, c.out)
			return false
		}
	}
	c.partial = append(c.partial[:0], b[off:]...)
	for w := 0; w < len(c.out); {
		k, errno := rawWrite(c.fd, c.out[w:])
		if errno == syscall.EAGAIN || errno == syscall.EINTR {
			continue // a benchmark floor: replies are tiny and the client reads them
		}
		if errno != 0 {
			return false
		}
		w += k
	}
	return true
}
