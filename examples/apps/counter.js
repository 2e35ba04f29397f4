#!/usr/bin/env node
// Example tenant app for tenement: a per-tenant visit counter over a Unix socket.
//
// No npm dependencies (only http, fs, path), so it runs with a bare Node 18+.
// Behaves exactly like counter.py (same routes, responses, counter file, log lines);
// only "runtime" differs.
//
// Environment (set by the supervisor):
//   SOCKET_PATH   Unix socket to listen on (required)
//   DATA_DIR      per-tenant directory that already exists; the counter lives here
//   INSTANCE_ID   tenant id, e.g. "alice"
//   SERVICE_NAME  service name from the config, e.g. "counterjs"
"use strict";

const fs = require("fs");
const http = require("http");
const path = require("path");

const RUNTIME = "node";
const COUNTER_FILE = "counter.txt";

function loadConfig() {
  const socketPath = process.env.SOCKET_PATH || "";
  if (!socketPath) {
    process.stderr.write(
      "counter.js: SOCKET_PATH is required (the Unix socket path to listen on)\n",
    );
    process.exit(2);
  }
  return {
    socketPath,
    dataDir: process.env.DATA_DIR || ".",
    instanceId: process.env.INSTANCE_ID || "unknown",
    service: process.env.SERVICE_NAME || "counterjs",
  };
}

function readCounter(file) {
  try {
    const n = parseInt(fs.readFileSync(file, "utf8").trim() || "0", 10);
    // Corrupt file: start over rather than refuse to serve.
    return Number.isFinite(n) ? n : 0;
  } catch (err) {
    if (err.code === "ENOENT") return 0;
    throw err;
  }
}

// Write temp file + rename so a crash never leaves a torn counter file.
// Node runs handlers on one thread and this is all synchronous, so no lock is needed.
function writeCounter(file, value) {
  const tmp = path.join(path.dirname(file), `.counter-${process.pid}.tmp`);
  fs.writeFileSync(tmp, `${value}\n`);
  fs.renameSync(tmp, file);
}

function incrementCounter(file) {
  const value = readCounter(file) + 1;
  writeCounter(file, value);
  return value;
}

function send(res, status, contentType, body) {
  const data = Buffer.from(body, "utf8");
  // Explicit Content-Length (not chunked) keeps responses identical to counter.py
  // and lets keep-alive clients reuse the connection.
  res.writeHead(status, {
    "Content-Type": contentType,
    "Content-Length": data.length,
  });
  res.end(data);
}

function log(line) {
  // console.log to a file or pipe is synchronous on Linux, so lines are never held back
  // (on macOS pipes are async; a line logged right before process.exit may be lost).
  console.log(line);
}

function removeStaleSocket(socketPath) {
  // A socket file left by a crashed previous run would make listen() fail (EADDRINUSE).
  try {
    fs.unlinkSync(socketPath);
  } catch (err) {
    if (err.code !== "ENOENT") throw err;
  }
}

function makeHandler(cfg) {
  const route = makeRouter(cfg);
  return (req, res) => {
    try {
      route(req, res);
    } catch (err) {
      // An uncaught throw would kill the whole instance; fail just this request instead
      // (e.g. DATA_DIR deleted or full disk), like counter.py does.
      process.stderr.write(`counter.js: ${req.method} ${req.url} failed: ${err.stack || err}\n`);
      if (!res.headersSent) send(res, 500, "text/plain; charset=utf-8", "internal error\n");
      log(`${req.method} ${(req.url || "/").split("?", 1)[0]} 500`);
    }
  };
}

function makeRouter(cfg) {
  const counterFile = path.join(cfg.dataDir, COUNTER_FILE);
  return (req, res) => {
    const urlPath = (req.url || "/").split("?", 1)[0];
    if (req.method === "GET" && urlPath === "/health") {
      const body = JSON.stringify({
        status: "ok",
        tenant: cfg.instanceId,
        service: cfg.service,
        runtime: RUNTIME,
      });
      send(res, 200, "application/json", body);
      log(`GET ${urlPath} 200`);
    } else if (req.method === "GET" && urlPath === "/") {
      const n = incrementCounter(counterFile);
      const body = `Hello from ${cfg.instanceId} on ${cfg.service} (${RUNTIME}): visit #${n}\n`;
      send(res, 200, "text/plain; charset=utf-8", body);
      log(`GET ${urlPath} 200 visit=${n}`);
    } else {
      send(res, 404, "text/plain; charset=utf-8", "not found\n");
      log(`${req.method} ${urlPath} 404`);
    }
  };
}

function main() {
  const cfg = loadConfig();
  removeStaleSocket(cfg.socketPath);
  const server = http.createServer(makeHandler(cfg));

  server.listen(cfg.socketPath, () => log(`listening on ${cfg.socketPath}`));

  let stopping = false;
  const shutdown = () => {
    if (stopping) return; // a second signal while draining changes nothing
    stopping = true;
    // close() stops accepting; idle keep-alive sockets would otherwise hold it open
    // until they time out, so drop them too (closeIdleConnections: Node 18.2+).
    server.close(() => {
      removeStaleSocket(cfg.socketPath);
      log("shut down");
      process.exit(0);
    });
    if (typeof server.closeIdleConnections === "function") server.closeIdleConnections();
  };
  process.on("SIGTERM", shutdown);
  // Ctrl-C when run by hand: same clean exit as counter.py's KeyboardInterrupt path.
  process.on("SIGINT", shutdown);
}

main();
