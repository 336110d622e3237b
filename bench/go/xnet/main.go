// The tutorial's server: golang.org/x/net/websocket with websocket.JSON.Receive/Send.
//
//	xnet PORT
package main

import (
	"log"
	"net/http"
	"os"

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

func echo(ws *websocket.Conn) {
	for {
		var msg Msg
		if err := websocket.JSON.Receive(ws, &msg); err != nil {
			return
		}
		if msg.Type != "echo" || msg.Data.N == nil {
			continue
		}
		reply := Msg{Type: "echo", Data: Echo{Message: "Thanks for the message!", N: msg.Data.N}}
		if err := websocket.JSON.Send(ws, reply); err != nil {
			return
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
