package main

// GO111MODULE=off go test ./bench/loadgen (tests/test_bench_harness.py runs it)

import (
	"bytes"
	"encoding/json"
	"testing"
)

func unmask(frame []byte) (byte, []byte) {
	n, h := int(frame[1]&0x7f), 2
	if n == 126 {
		n, h = int(frame[2])<<8|int(frame[3]), 4
	}
	mk := frame[h : h+4]
	p := append([]byte(nil), frame[h+4:h+4+n]...)
	for i := range p {
		p[i] ^= mk[i&3]
	}
	return frame[0], p
}

func TestPoolFramesUnmaskToTheRequest(t *testing.T) {
	for _, proto := range []int{protoWS, protoSIO} {
		pool := newPool(echoPayload(proto), proto)
		var d [nDigits]byte
		setDigits(&d, nBase)
		keys := map[string]bool{}
		for i := 0; i < 3000; i++ {
			f := pool.append(nil, &d)
			op, p := unmask(f)
			keys[string(f[2:6])] = true
			want := []byte(`{"type":"echo","data":{"message":"hello server!","n":` + string(d[:]) + `}}`)
			if proto == protoSIO {
				want = []byte(`42` + string(d[:]) + `["echo",{"message":"hello server!","n":` + string(d[:]) + `}]`)
			}
			if op != 0x81 || !bytes.Equal(p, want) {
				t.Fatalf("frame %d: op %x payload %q, want %q", i, op, p, want)
			}
			incDigits(&d)
		}
		if len(keys) < poolSize/2 {
			t.Fatalf("only %d distinct mask keys", len(keys))
		}
		if string(d[:]) != "1000003000" {
			t.Fatalf("digits %q", d)
		}
	}
	tcp := newPool(echoPayload(protoTCP), protoTCP)
	var d [nDigits]byte
	setDigits(&d, 1234567890)
	if got := string(tcp.append(nil, &d)); got != `{"type":"echo","data":{"message":"hello server!","n":1234567890}}`+"\n" {
		t.Fatalf("tcp line %q", got)
	}
}

func TestIncDigitsCarries(t *testing.T) {
	var d [nDigits]byte
	setDigits(&d, 1999999999)
	incDigits(&d)
	if string(d[:]) != "2000000000" {
		t.Fatalf("%q", d)
	}
}

func TestTemplate(t *testing.T) {
	var tm tmpl
	if _, ok := tm.match([]byte(`{}`)); ok {
		t.Fatal("an empty template matches nothing")
	}
	first := []byte(`{"type":"broadcast","data":{"message":"xx","n":1000000001},"room":"all","off":7}`)
	tm.learn(first, 1000000001)
	cases := []struct {
		p  string
		n  uint64
		ok bool
	}{
		{`{"type":"broadcast","data":{"message":"xx","n":1000000002},"room":"all","off":8}`, 1000000002, true},
		{`{"type":"broadcast","data":{"message":"xx","n":1000000003},"room":"all","off":12345}`, 1000000003, true},
		{`{"type":"broadcast","data":{"message":"xy","n":1000000003},"room":"all","off":9}`, 0, false},
		{`{"type":"broadcast","data":{"message":"xx","n":100000003},"room":"all","off":9}`, 0, false},
		{`{"type":"broadcast","data":{"message":"xx","n":1000000003},"room":"all","off":9} `, 0, false},
		{`{"type":"broadcast","data":{"message":"xx","n":1000000003},"room":"all","off":}`, 0, false},
		{`{"type":"broadcast","data":{"message":"xx","n":1000000003},"room":"all"}`, 0, false},
	}
	for _, c := range cases {
		n, ok := tm.match([]byte(c.p))
		if ok != c.ok || n != c.n {
			t.Errorf("%s: got %d %v, want %d %v", c.p, n, ok, c.n, c.ok)
		}
	}
	// Socket.IO: the ack id and n must be the same number
	tm.learn([]byte(`431000000005[{"message":"Thanks for the message!","n":1000000005}]`), 1000000005)
	if n, ok := tm.match([]byte(`431000000006[{"message":"Thanks for the message!","n":1000000006}]`)); !ok || n != 1000000006 {
		t.Errorf("sio ack: %d %v", n, ok)
	}
	if _, ok := tm.match([]byte(`431000000006[{"message":"Thanks for the message!","n":1000000007}]`)); ok {
		t.Error("sio ack with id != n matched")
	}
}

func TestFullChecks(t *testing.T) {
	ok := []string{
		`{"type":"echo","data":{"message":"Thanks for the message!","n":1000000001}}`,
		`{"type": "echo", "data": {"message": "Thanks for the message!", "n": 1000000001}}`,
		`{"data":{"n":1000000001,"message":"Thanks for the message!"},"type":"echo","id":null}`,
	}
	for _, p := range ok {
		if n, v, why := checkEcho([]byte(p), protoWS); v != vOK || n != 1000000001 {
			t.Errorf("%s: %d %v %s", p, n, v, why)
		}
	}
	bad := []string{
		`{"type":"echo","data":{"message":"Thanks!","n":1000000001}}`,
		`{"type":"echo","data":{"message":"Thanks for the message!","n":"1000000001"}}`,
		`{"type":"echo","data":{"message":"Thanks for the message!","n":1000000001.0}}`,
		`{"type":"echo","data":{"message":"Thanks for the message!"}}`,
		`not json`,
	}
	for _, p := range bad {
		if _, v, _ := checkEcho([]byte(p), protoWS); v != vBad {
			t.Errorf("%s: verdict %v, want bad", p, v)
		}
	}
	if _, v, _ := checkEcho([]byte(`{"type":"welcome","data":{}}`), protoWS); v != vOther {
		t.Error("welcome is not other")
	}
	if n, v, _ := checkEcho([]byte(`431000000009[{"message":"Thanks for the message!","n":1000000009}]`), protoSIO); v != vOK || n != 1000000009 {
		t.Error("sio ack")
	}
	if _, v, _ := checkEcho([]byte(`431000000009[{"message":"Thanks for the message!","n":1000000008}]`), protoSIO); v != vBad {
		t.Error("sio ack with id != n")
	}
	if n, v, _ := checkBroadcast([]byte(`{"type":"broadcast","data":{"message":"xx","n":1000000004},"room":"all"}`), "xx"); v != vOK || n != 1000000004 {
		t.Error("broadcast")
	}
	if _, v, _ := checkBroadcast([]byte(`{"type":"broadcast","data":{"message":"x","n":1000000004}}`), "xx"); v != vBad {
		t.Error("broadcast with a cut message")
	}
}

func TestCheckUpgrade(t *testing.T) {
	key := "dGhlIHNhbXBsZSBub25jZQ=="
	good := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
	if err := checkUpgrade([]byte(good), key); err != nil {
		t.Fatal(err)
	}
	if err := checkUpgrade([]byte(good[:len(good)-3]+"xx="), key); err == nil {
		t.Fatal("a wrong accept passed")
	}
	if err := checkUpgrade([]byte("HTTP/1.1 400 Bad Request\r\n"), key); err == nil {
		t.Fatal("400 passed")
	}
}

func TestSessionRequestsCarrySeqAndAPaddedAck(t *testing.T) {
	pool := newPool(`{"type":"echo","data":{"message":"hello server!","n":%N},"seq":%S,"ack":%A}`, protoWS)
	var d [nDigits]byte
	setDigits(&d, nBase+7)
	for _, ack := range []uint64{0, 9, 123, 1234567890} {
		_, p := unmask(pool.appendSession(nil, &d, ack+1, ack))
		var env struct {
			Data struct{ N uint64 } `json:"data"`
			Seq  uint64             `json:"seq"`
			Ack  uint64             `json:"ack"`
		}
		if err := json.Unmarshal(p, &env); err != nil || env.Data.N != nBase+7 || env.Seq != ack+1 || env.Ack != ack {
			t.Fatalf("ack %d: %q -> %+v (%v)", ack, p, env, err)
		}
	}
	var a [nDigits]byte
	padDigits(&a, 42)
	if string(a[:]) != "        42" {
		t.Fatalf("padDigits(42) = %q", a)
	}
}

func TestSeenFollowsTheDirectStream(t *testing.T) {
	c := &conn{}
	c.seen([]byte(`{"type":"welcome","data":{}}`), false)
	c.seen([]byte(`{"type":"joined","data":{},"room":"all","seq":1}`), false)
	c.seen([]byte(`{"type":"echo","data":{"message":"Thanks for the message!","n":1000000000},"seq":2,"ack":1000000000}`), false)
	c.seen(nil, true) // a reply that matched its template: the next one
	if c.lastSeq != 3 {
		t.Fatalf("lastSeq %d", c.lastSeq)
	}
}
