// An upstream-style Node app: HTTP and WebSocket on 127.0.0.1:$PORT only (no Unix socket).
//   GET /health   200            GET /whoami   {"instance", "pid", "port"}
//   GET /stream   5 chunks, 50 ms apart (chunked)
//   WS  /ws       echoes text and binary messages
// WebSockets come from Debian's node-ws (NODE_PATH=/usr/share/nodejs).
"use strict";
const http = require("http");
const { WebSocketServer } = require("ws");

const port = Number(process.env.PORT);
if (!port) throw new Error("PORT is not set");

const server = http.createServer((req, res) => {
  if (req.url === "/health") {
    res.writeHead(200, { "content-type": "text/plain" });
    res.end("ok");
  } else if (req.url === "/whoami") {
    const body = { instance: process.env.INSTANCE_ID, pid: process.pid, port: String(port) };
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify(body));
  } else if (req.url === "/stream") {
    res.writeHead(200, { "content-type": "text/plain" });
    let n = 0;
    const timer = setInterval(() => {
      res.write(`chunk ${n}\n`);
      if (++n === 5) {
        clearInterval(timer);
        res.end();
      }
    }, 50);
    req.on("close", () => clearInterval(timer));
  } else {
    res.writeHead(404);
    res.end();
  }
});

const wss = new WebSocketServer({ server, path: "/ws" });
wss.on("connection", (ws) => {
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
});

server.listen(port, "127.0.0.1", () => console.log(`listening on 127.0.0.1:${port}`));
process.on("SIGTERM", () => process.exit(0));
