package main

// -session: the client side of tether's resume (docs/protocol.md, "Sessions and resume"), as
// tether's own clients speak it, so that its cost is measured on the same workloads:
//
//   - the handshake offers the subprotocols "tether, session": the server opens a session,
//     numbers every direct message it sends (replies, emits: "seq") and keeps each one until
//     the client acks it;
//   - every request carries "seq" (1, 2, ... on each connection) and "ack", the seq of the last
//     numbered message received. A frame is built from a pool, so both have a fixed width:
//     right-aligned in nDigits characters, spaces before them (JSON allows them).
//
// A server's direct stream is gap-free and in order, so a reply that matched its template is
// the next numbered message; any other message is parsed for its seq.

import (
	"encoding/json"
	"flag"
)

var flagSession = flag.Bool("session", false, "offer the subprotocols \"tether, session\" (tether's resume): "+
	"requests carry seq and the ack of the last numbered message received")

const sessionOffer = "Sec-WebSocket-Protocol: tether, session\r\n"

// withSession adds the session fields to a JSON request payload (an object).
func withSession(payload string) string {
	if !*flagSession {
		return payload
	}
	return payload[:len(payload)-1] + `,"seq":%S,"ack":%A}`
}

// next: the seq of c's next request.
func (c *conn) next() uint64 {
	c.reqSeq++
	return c.reqSeq
}

// seen: p arrived on c; fast: it matched its template (an echo reply: the next numbered message).
func (c *conn) seen(p []byte, fast bool) {
	if fast {
		c.lastSeq++
		return
	}
	var env struct {
		Seq *uint64 `json:"seq"`
	}
	if json.Unmarshal(p, &env) == nil && env.Seq != nil && *env.Seq > c.lastSeq {
		c.lastSeq = *env.Seq
	}
}

// padDigits writes v right-aligned in d, spaces before it.
func padDigits(d *[nDigits]byte, v uint64) {
	i := nDigits - 1
	for ; i >= 0; i-- {
		d[i] = byte('0' + v%10)
		v /= 10
		if v == 0 {
			i--
			break
		}
	}
	for ; i >= 0; i-- {
		d[i] = ' '
	}
}
