// The tutorial's server: golang.org/x/net/websocket with websocket.JSON.Receive/Send.
// Broadcast ({"type":"broadcast",...}): encoded once, then websocket.Message.Send to every
// connection (x/net frames it per receiver; Conn.Write is safe from several goroutines).
//
//	xnet PORT
package main

import (
	"encoding/json"
	"log"
	"net/http"
	"os"
	"sync"

	"golang.org/x/net/websocket"
)

type Echo struct {
	Message string `json:"message"`
	N       *int   `json:"n"`
}

type Msg struct {
	Type string `json:"type"`
	Data Echo   `json:"data"`
}

var (
	mu    sync.Mutex
	conns = map[*websocket.Conn]struct{}{}
)

func broadcast(msg Msg) {
	b, err := json.Marshal(msg)
	if err != nil {
		return
	}
	s := string(b)
	mu.Lock()
	defer mu.Unlock()
	for c := range conns {
		websocket.Message.Send(c, s)
	}
}

func echo(ws *websocket.Conn) {
	mu.Lock()
	conns[ws] = struct{}{}
	mu.Unlock()
	defer func() {
		mu.Lock()
		delete(conns, ws)
		mu.Unlock()
	}()
	for {
		var msg Msg
		if err := websocket.JSON.Receive(ws, &msg); err != nil {
			return
		}
		if msg.Data.N == nil {
			continue
		}
		switch msg.Type {
		case "echo":
			reply := Msg{Type: "echo", Data: Echo{Message: "Thanks for the message!", N: msg.Data.N}}
			if err := websocket.JSON.Send(ws, reply); err != nil {
				return
			}
		case "broadcast":
			broadcast(msg)
		}
	}
}

func main() {
	port := "9100"
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	http.Handle("/", websocket.Handler(echo))
	log.Fatal(http.ListenAndServe("127.0.0.1:"+port, nil))
}
