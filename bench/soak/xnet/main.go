// Go x/net/websocket for the many-connections soak (bench/soak.py): bench/go/xnet (the tutorial's
// server) plus what the soak needs.
//
//   - keepalive: one timer per connection (time.AfterFunc, no goroutine while it waits) writes a
//     ping every PING_INTERVAL seconds. x/net answers pings but swallows pongs (hybiFrameHandler
//     discards them), so it cannot tell a dead peer by its pongs: nothing is closed for a missing
//     pong here (tether and Node ws do close);
//
//   - {"type":"req","data":{"n"},"id"} -> {"type":"reply","data":n,"id"};
//
//   - {"type":"subscribe","data":{"room"},"id"} -> joins room "b", reply true;
//
//   - {"type":"shout","data":{...},"id"} -> {"type":"tick","data":...,"room":"b"} encoded once,
//     websocket.Message.Send to every member, reply the number of receivers;
//
//   - {"type":"stats","id"} -> {"connections","goroutines","requests","closed","members"};
//
//   - the handler ends with ws.Close(), which sends the close frame (1000): x/net's server
//     closes the TCP connection without one when the handler just returns (the tutorial's does).
//
//     xnet-soak PORT [PING_INTERVAL]
package main

import (
	"encoding/json"
	"io"
	"log"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/websocket"
)

type Msg struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
	ID   json.RawMessage `json:"id"`
}

type Reply struct {
	Type string          `json:"type"`
	Data any             `json:"data"`
	ID   json.RawMessage `json:"id"`
}

type Tick struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
	Room string          `json:"room"`
}

var (
	mu       sync.Mutex
	conns    = map[*websocket.Conn]struct{}{}
	members  = map[*websocket.Conn]struct{}{}
	closed   = map[string]int{}
	requests int
	interval = 20 * time.Second

	// A codec whose frames are pings: Codec.Send takes the connection's write lock, so a ping
	// never interleaves with a reply or a broadcast written by another goroutine.
	pingCodec = websocket.Codec{
		Marshal:   func(v any) ([]byte, byte, error) { return []byte("ka"), websocket.PingFrame, nil },
		Unmarshal: func([]byte, byte, any) error { return nil },
	}
)

func send(ws *websocket.Conn, v any) error { return websocket.JSON.Send(ws, v) }

func shout(data json.RawMessage) int {
	b, err := json.Marshal(Tick{Type: "tick", Data: data, Room: "b"})
	if err != nil {
		return 0
	}
	s := string(b)
	mu.Lock()
	defer mu.Unlock()
	for c := range members {
		websocket.Message.Send(c, s)
	}
	return len(members)
}

func stats() map[string]any {
	mu.Lock()
	defer mu.Unlock()
	cl := map[string]int{}
	for k, v := range closed {
		cl[k] = v
	}
	return map[string]any{"connections": len(conns), "goroutines": runtime.NumGoroutine(),
		"requests": requests, "closed": cl, "members": len(members)}
}

func handle(ws *websocket.Conn) {
	mu.Lock()
	conns[ws] = struct{}{}
	mu.Unlock()
	var timer *time.Timer
	timer = time.AfterFunc(interval, func() {
		if pingCodec.Send(ws, nil) == nil {
			timer.Reset(interval)
		}
	})
	why := "eof"
	defer func() {
		timer.Stop()
		mu.Lock()
		delete(conns, ws)
		delete(members, ws)
		closed[why]++
		mu.Unlock()
		ws.Close() // the close frame (1000), then the TCP close
	}()
	for {
		var msg Msg
		if err := websocket.JSON.Receive(ws, &msg); err != nil {
			if err != io.EOF {
				why = "error"
			}
			return
		}
		var out any
		switch msg.Type {
		case "req":
			var d struct {
				N *int64 `json:"n"`
			}
			if json.Unmarshal(msg.Data, &d) != nil || d.N == nil {
				continue
			}
			mu.Lock()
			requests++
			mu.Unlock()
			out = *d.N
		case "subscribe":
			mu.Lock()
			members[ws] = struct{}{}
			mu.Unlock()
			out = true
		case "shout":
			out = shout(msg.Data)
		case "stats":
			out = stats()
		default:
			continue
		}
		if err := send(ws, Reply{Type: "reply", Data: out, ID: msg.ID}); err != nil {
			why = "error"
			return
		}
	}
}

func main() {
	port := "9100"
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	if len(os.Args) > 2 {
		s, err := strconv.ParseFloat(os.Args[2], 64)
		if err != nil {
			log.Fatal(err)
		}
		interval = time.Duration(s * float64(time.Second))
	}
	http.Handle("/", websocket.Handler(handle))
	log.Printf("LISTENING %s", port)
	log.Fatal(http.ListenAndServe("127.0.0.1:"+port, nil))
}
