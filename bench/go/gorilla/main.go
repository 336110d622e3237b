// gorilla/websocket peer, as its examples show: ReadJSON / WriteJSON.
// Broadcast ({"type":"broadcast",...}): one PreparedMessage (framed once), written to every
// connection; gorilla allows one writer at a time per connection, hence the per-connection lock.
//
//	gorilla PORT
package main

import (
	"encoding/json"
	"log"
	"net/http"
	"os"
	"sync"

	"github.com/gorilla/websocket"
)

type Echo struct {
	Message string `json:"message"`
	N       *int   `json:"n"`
}

type Msg struct {
	Type string `json:"type"`
	Data Echo   `json:"data"`
}

type client struct {
	c  *websocket.Conn
	mu sync.Mutex // one writer at a time
}

var (
	upgrader = websocket.Upgrader{}
	mu       sync.Mutex
	clients  = map[*client]struct{}{}
)

func broadcast(msg Msg) {
	b, err := json.Marshal(msg)
	if err != nil {
		return
	}
	pm, err := websocket.NewPreparedMessage(websocket.TextMessage, b)
	if err != nil {
		return
	}
	mu.Lock()
	defer mu.Unlock()
	for cl := range clients {
		cl.mu.Lock()
		cl.c.WritePreparedMessage(pm)
		cl.mu.Unlock()
	}
}

func echo(w http.ResponseWriter, r *http.Request) {
	c, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer c.Close()
	cl := &client{c: c}
	mu.Lock()
	clients[cl] = struct{}{}
	mu.Unlock()
	defer func() {
		mu.Lock()
		delete(clients, cl)
		mu.Unlock()
	}()
	for {
		var msg Msg
		if err := c.ReadJSON(&msg); err != nil {
			return
		}
		if msg.Data.N == nil {
			continue
		}
		switch msg.Type {
		case "echo":
			reply := Msg{Type: "echo", Data: Echo{Message: "Thanks for the message!", N: msg.Data.N}}
			cl.mu.Lock()
			err = c.WriteJSON(reply)
			cl.mu.Unlock()
			if err != nil {
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
	http.HandleFunc("/", echo)
	log.Fatal(http.ListenAndServe("127.0.0.1:"+port, nil))
}
