// Node `ws` peer, as its README shows; also the broadcast peer (a loop over wss.clients).
//   node ws_server.js PORT
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2] || 9100);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });

function validEcho(d) {
  return d !== null && typeof d === 'object' && typeof d.message === 'string' && Number.isInteger(d.n);
}

wss.on('connection', function connection(ws) {
  ws.on('error', console.error);
  ws.on('message', function message(raw, isBinary) {
    let msg;
    try { msg = JSON.parse(raw); } catch (e) { return; }
    if (msg.type === 'echo' && validEcho(msg.data)) {
      ws.send(JSON.stringify({ type: 'echo', data: { message: 'Thanks for the message!', n: msg.data.n } }));
    } else if (msg.type === 'broadcast') {
      const out = JSON.stringify(msg);
      wss.clients.forEach(function each(client) {
        if (client.readyState === WebSocket.OPEN) client.send(out);
      });
    }
  });
});
