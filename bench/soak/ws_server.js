// Node `ws` for the many-connections soak (bench/soak.py): bench/node/ws_server.js plus what the
// soak needs, written as the ws README shows it:
//   - keepalive: every PING_INTERVAL seconds one timer pings every client; a client that did not
//     answer the previous ping is terminated (the README's "detect broken connections");
//   - {"type":"req","data":{"n"},"id"} -> {"type":"reply","data":n,"id"};
//   - {"type":"subscribe","data":{"room"},"id"} -> joins the room (a Set), reply true;
//   - {"type":"shout","data":{...},"id"} -> {"type":"tick","data":...,"room":"b"} to every member,
//     one JSON.stringify, reply the number of receivers;
//   - {"type":"stats","id"} -> {"connections","requests","closed":{code:count},"members"}.
//
//   node bench/soak/ws_server.js PORT [PING_INTERVAL]
'use strict';
const path = require('path');
const { WebSocketServer, WebSocket } = require(path.join(__dirname, '..', 'node', 'node_modules', 'ws'));

const port = Number(process.argv[2] || 9100);
const interval = Number(process.argv[3] || 20) * 1000;
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
const rooms = new Map();
const closed = {};
let requests = 0;

function reply(ws, id, data) {
  ws.send(JSON.stringify({ type: 'reply', data, id }));
}

wss.on('connection', function connection(ws) {
  ws.isAlive = true;
  ws.rooms = [];
  ws.on('error', console.error);
  ws.on('pong', function heartbeat() { this.isAlive = true; });
  ws.on('close', function (code) {
    closed[code] = (closed[code] || 0) + 1;
    for (const room of this.rooms) rooms.get(room).delete(this);
  });
  ws.on('message', function message(raw) {
    let msg;
    try { msg = JSON.parse(raw); } catch (e) { return; }
    const d = msg.data;
    if (msg.type === 'req' && d !== null && typeof d === 'object' && Number.isInteger(d.n)) {
      requests++;
      reply(ws, msg.id, d.n);
    } else if (msg.type === 'subscribe' && d && typeof d.room === 'string') {
      if (!rooms.has(d.room)) rooms.set(d.room, new Set());
      rooms.get(d.room).add(ws);
      ws.rooms.push(d.room);
      reply(ws, msg.id, true);
    } else if (msg.type === 'shout') {
      const out = JSON.stringify({ type: 'tick', data: d, room: 'b' });
      let n = 0;
      for (const client of rooms.get('b') || []) {
        if (client.readyState === WebSocket.OPEN) { client.send(out); n++; }
      }
      reply(ws, msg.id, n);
    } else if (msg.type === 'stats') {
      reply(ws, msg.id, { connections: wss.clients.size, requests, closed, members: (rooms.get('b') || new Set()).size });
    }
  });
});

const pinger = setInterval(function ping() {
  wss.clients.forEach(function each(ws) {
    if (ws.isAlive === false) return ws.terminate();
    ws.isAlive = false;
    ws.ping();
  });
}, interval);

wss.on('listening', () => console.log(`LISTENING ${port}`));
wss.on('close', () => clearInterval(pinger));
process.on('SIGINT', () => { wss.close(); process.exit(0); });
process.on('SIGTERM', () => { wss.close(); process.exit(0); });
