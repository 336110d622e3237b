// gorilla/websocket peer, as its examples show: ReadJSON / WriteJSON.
//
//	gorilla PORT
package main

import (
	"log"
	"net/http"
	"os"

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

var upgrader = websocket.Upgrader{}

func echo(w http.ResponseWriter, r *http.Request) {
	c, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	defer c.Close()
	for {
		var msg Msg
		if err := c.ReadJSON(&msg); err != nil {
			return
		}
		if msg.Type != "echo" || msg.Data.N == nil {
			continue
		}
		reply := Msg{Type: "echo", Data: Echo{Message: "Thanks for the message!", N: msg.Data.N}}
		if err := c.WriteJSON(reply); err != nil {
			return
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
