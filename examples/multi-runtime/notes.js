#!/usr/bin/env node
// Multi-runtime example: a per-tenant notes API with its own bearer token, in Node.
//
// Node 18+ standard library only (no npm install). notes.py is the same program in
// Python; the two answer the same requests with the same status codes and JSON shapes,
// only "runtime" differs.
//
// Environment (set by the supervisor):
//   SOCKET_PATH   Unix socket to listen on (required)
//   DATA_DIR      this tenant's private directory, already created 0700 (required)
//   INSTANCE_ID   tenant id, e.g. "alice" (required)
//   SERVICE_NAME  service name from the config, e.g. "notes-js"
//
// Files in DATA_DIR: api_token (created on first start, mode 0600, reused afterwards) and
// notes.json (rewritten atomically on every new note).
"use strict";

const crypto = require("node:crypto");
const fs = require("node:fs");
const http = require("node:http");
const path = require("node:path");

const RUNTIME = "node";
const MAX_BODY = 64 * 1024;
// A rejected body up to this size is read and discarded (Node does it after the response)
// so the keep-alive connection survives; a bigger or chunked one closes the connection.
const DRAIN_LIMIT = 1024 * 1024;
// Above the 60 s idle timeout of common proxies' upstream pools, so the app is never the
// side that closes a pooled connection just as a request is sent on it.
const IDLE_TIMEOUT_MS = 65_000;
// On SIGTERM, requests in flight get this long before the process exits anyway.
const SHUTDOWN_GRACE_MS = 2_000;
const BEARER = /^Bearer +([A-Za-z0-9\-._~+/]+=*)$/i;

class HttpError extends Error {
  constructor(status, message, headers = {}) {
    super(message);
    this.status = status;
    this.headers = headers;
  }
}

function fail(message) {
  process.stderr.write(`notes.js: ${message}\n`);
  process.exit(2);
}

function loadConfig() {
  const env = process.env;
  const missing = ["SOCKET_PATH", "DATA_DIR", "INSTANCE_ID"].filter((k) => !env[k]);
  if (missing.length) {
    fail(`${missing.join(", ")} must be set (tenement sets them for every instance)`);
  }
  return {
    socketPath: env.SOCKET_PATH,
    dataDir: env.DATA_DIR,
    instanceId: env.INSTANCE_ID,
    service: env.SERVICE_NAME || "notes-js",
  };
}

// This tenant's API token: read it, or create it once (0600) if there is none.
function loadOrCreateToken(dataDir) {
  const file = path.join(dataDir, "api_token");
  if (!fs.existsSync(file)) {
    const tmp = path.join(dataDir, `.api_token-${process.pid}.tmp`);
    const fd = fs.openSync(tmp, "wx", 0o600);
    try {
      fs.writeSync(fd, `${crypto.randomBytes(32).toString("hex")}\n`);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    try {
      // link, unlike rename, never replaces a token someone created meanwhile.
      fs.linkSync(tmp, file);
    } catch (err) {
      if (err.code !== "EEXIST") throw err;
    } finally {
      fs.unlinkSync(tmp);
    }
  }
  // A secret: tighten a copy that was restored with looser bits.
  if (fs.statSync(file).mode & 0o077) fs.chmodSync(file, 0o600);
  const token = fs.readFileSync(file, "utf8").trim();
  if (!BEARER.test(`Bearer ${token}`)) {
    // Never silently replace a secret that clients may hold; let the operator decide.
    fail(`${file} is empty or malformed; delete it to generate a new token`);
  }
  return token;
}

// The token of an `Authorization: Bearer <token>` header, null if absent or malformed.
function bearerToken(header) {
  const match = typeof header === "string" ? BEARER.exec(header.trim()) : null;
  return match ? match[1] : null;
}

function tokensMatch(given, expected) {
  // Hashing first gives equal lengths, so the comparison leaks neither content nor length.
  const hash = (t) => crypto.createHash("sha256").update(t, "utf8").digest();
  return crypto.timingSafeEqual(hash(given), hash(expected));
}

// fatal: invalid UTF-8 is a 400; ignoreBOM keeps a BOM so JSON.parse refuses it, as Python does.
const UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

function parseNote(body) {
  let data;
  try {
    data = JSON.parse(UTF8.decode(body));
  } catch {
    throw new HttpError(400, 'body must be JSON like {"text": "..."}');
  }
  const isObject = data !== null && typeof data === "object" && !Array.isArray(data);
  if (!isObject || typeof data.text !== "string" || !data.text) {
    throw new HttpError(400, 'body must be a JSON object with a non-empty string "text"');
  }
  return data.text;
}

// Notes in one JSON file. Handlers run on one thread and these calls are synchronous,
// so read-modify-write needs no lock.
class NoteStore {
  constructor(file) {
    this.file = file;
  }

  all() {
    let text;
    try {
      text = fs.readFileSync(this.file, "utf8");
    } catch (err) {
      if (err.code === "ENOENT") return [];
      throw err;
    }
    // A corrupt file throws (500) rather than being overwritten: stored notes stay.
    const notes = JSON.parse(text);
    if (!Array.isArray(notes)) throw new Error(`${this.file}: expected a JSON list`);
    return notes;
  }

  add(text) {
    const notes = this.all();
    const nextId = notes.reduce((max, n) => Math.max(max, n.id), 0) + 1;
    const note = { id: nextId, text, created_at: new Date().toISOString() };
    this.write([...notes, note]);
    return note;
  }

  // Temp file + fsync + rename: a crash leaves the old file or the new one, never half.
  write(notes) {
    const tmp = path.join(path.dirname(this.file), `.notes-${process.pid}.tmp`);
    try {
      const fd = fs.openSync(tmp, "w", 0o600);
      try {
        fs.writeSync(fd, JSON.stringify(notes));
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, this.file);
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      throw err;
    }
  }
}

function readBody(req) {
  const declared = Number(req.headers["content-length"] || 0);
  if (declared > MAX_BODY) return Promise.reject(new HttpError(413, `body over ${MAX_BODY} bytes`));
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    const onData = (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        req.off("data", onData); // stop buffering; the response closes the connection
        reject(new HttpError(413, `body over ${MAX_BODY} bytes`));
      } else {
        chunks.push(chunk);
      }
    };
    req.on("data", onData);
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

// Whether to close after this response: an oversized body is not worth reading, just to
// find where the next request starts.
function mustClose(req, status) {
  if (status === 413) return true;
  if (req.complete) return false;
  const declared = req.headers["content-length"];
  if (declared === undefined) return req.headers["transfer-encoding"] !== undefined;
  return Number(declared) > DRAIN_LIMIT;
}

function sendJson(req, res, status, payload, headers = {}) {
  const data = Buffer.from(JSON.stringify(payload), "utf8");
  // Explicit Content-Length, never chunked, so keep-alive clients know where it ends.
  const close = mustClose(req, status) ? { Connection: "close" } : {};
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": data.length,
    ...headers,
    ...close,
  });
  res.end(req.method === "HEAD" ? undefined : data);
}

function allow(req, ...methods) {
  if (!methods.includes(req.method)) {
    throw new HttpError(405, "method not allowed", { Allow: methods.join(", ") });
  }
}

function makeApp(cfg, token, store) {
  function authorize(req) {
    // headersDistinct: two Authorization headers are malformed, not "use the first".
    const values = req.headersDistinct.authorization || [];
    const given = values.length === 1 ? bearerToken(values[0]) : null;
    if (given === null) {
      const challenge = { "WWW-Authenticate": 'Bearer realm="notes"' };
      throw new HttpError(401, "missing or malformed bearer token", challenge);
    }
    if (!tokensMatch(given, token)) throw new HttpError(403, "invalid token");
  }

  async function route(req, urlPath) {
    if (urlPath === "/health") {
      allow(req, "GET", "HEAD");
      const health = { status: "ok", tenant: cfg.instanceId, runtime: RUNTIME };
      return [200, { ...health, service: cfg.service }];
    }
    authorize(req);
    if (urlPath !== "/notes") throw new HttpError(404, "not found");
    allow(req, "GET", "HEAD", "POST");
    if (req.method === "POST") return [201, store.add(parseNote(await readBody(req)))];
    return [200, { tenant: cfg.instanceId, notes: store.all() }];
  }

  return async (req, res) => {
    const urlPath = (req.url || "/").split("?", 1)[0];
    // One line per request, once the response is sent. The token is never logged.
    res.on("finish", () => console.log(`${req.method} ${urlPath} ${res.statusCode}`));
    try {
      const [status, payload] = await route(req, urlPath);
      sendJson(req, res, status, payload);
    } catch (err) {
      if (err instanceof HttpError) {
        sendJson(req, res, err.status, { error: err.message }, err.headers);
        return;
      }
      // Details go to stderr (the supervisor's log), never to the client.
      process.stderr.write(`notes.js: ${req.method} ${urlPath} failed: ${err.stack || err}\n`);
      if (!res.headersSent) sendJson(req, res, 500, { error: "internal error" });
    }
  };
}

// Remove a socket left by a crashed run (listen would fail), but never another file.
function removeStaleSocket(socketPath) {
  let stat;
  try {
    stat = fs.lstatSync(socketPath);
  } catch (err) {
    if (err.code === "ENOENT") return;
    throw err;
  }
  if (!stat.isSocket()) fail(`${socketPath} exists and is not a socket; refusing to remove it`);
  fs.unlinkSync(socketPath);
}

function main() {
  const cfg = loadConfig();
  const token = loadOrCreateToken(cfg.dataDir);
  const store = new NoteStore(path.join(cfg.dataDir, "notes.json"));
  removeStaleSocket(cfg.socketPath);
  const server = http.createServer(makeApp(cfg, token, store));
  server.keepAliveTimeout = IDLE_TIMEOUT_MS;
  server.listen(cfg.socketPath, () => console.log(`listening on ${cfg.socketPath}`));

  let stopping = false;
  const shutdown = () => {
    if (stopping) return; // a second signal while draining changes nothing
    stopping = true;
    const exit = () => {
      removeStaleSocket(cfg.socketPath);
      console.log("shut down");
      process.exit(0);
    };
    // close() stops accepting and waits for open connections: drop the idle keep-alive
    // ones now, and give requests in flight a bounded grace.
    server.close(exit);
    server.closeIdleConnections();
    setTimeout(exit, SHUTDOWN_GRACE_MS).unref();
  };
  process.on("SIGTERM", shutdown);
  process.on("SIGINT", shutdown);
}

main();
