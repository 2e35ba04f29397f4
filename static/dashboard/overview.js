// Live overview: a WebSocket (/ws/overview/ with this page's filters) sends the counts and
// the re-rendered rows of the visible page whenever something changes.
(() => {
  "use strict";
  const region = document.getElementById("instances");
  const status = document.getElementById("live-status");
  if (!region || !status || !("WebSocket" in window)) return;

  const MIN_DELAY = 500;
  const MAX_DELAY = 10000;
  const FORBIDDEN = 4403; // not (or no longer) a staff session
  let delay = MIN_DELAY;
  let lastHtml = null;
  let pending = null; // an update held back while a pointer is down on the rows
  let pointerDown = false;

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}${region.dataset.wsPath}${location.search}`;
  }

  function setStatus(text) {
    if (status.textContent !== text) status.textContent = text;
    status.dataset.status = text;
  }

  function setCounts(counts) {
    for (const [name, n] of Object.entries(counts)) {
      const strong = document.querySelector(`.counts [data-count="${name}"] strong`);
      if (strong && strong.textContent !== String(n)) strong.textContent = String(n);
    }
  }

  // Keyboard users keep their place: remember which control had focus, find it again.
  function focused() {
    const el = document.activeElement;
    if (!el || !region.contains(el)) return null;
    const row = el.closest("tr[data-key]");
    return { key: row ? row.dataset.key : null, action: el.dataset.action || null, id: el.id };
  }

  function refocus(saved) {
    if (!saved) return;
    let el = saved.id ? document.getElementById(saved.id) : null;
    if (!el && saved.key) {
      const row = region.querySelector(`tr[data-key="${CSS.escape(saved.key)}"]`);
      const selector = saved.action ? `[data-action="${saved.action}"]` : "a.instance-link";
      el = row && row.querySelector(selector);
    }
    if (el) el.focus({ preventScroll: true });
  }

  function swapRows(html) {
    if (html === lastHtml) return;
    if (pointerDown) {
      pending = html;
      return;
    }
    const saved = focused();
    region.innerHTML = html;
    lastHtml = html;
    refocus(saved);
  }

  region.addEventListener("pointerdown", () => { pointerDown = true; });
  document.addEventListener("pointerup", release);
  document.addEventListener("pointercancel", release);
  function release() {
    pointerDown = false;
    if (pending !== null) {
      const html = pending;
      pending = null;
      // After the click that this pointerup ends has been dispatched.
      setTimeout(() => swapRows(html), 0);
    }
  }

  function connect() {
    const socket = new WebSocket(socketUrl());
    socket.addEventListener("open", () => setStatus("live"));
    socket.addEventListener("message", (event) => {
      const message = JSON.parse(event.data);
      if (message.type !== "update") return;
      delay = MIN_DELAY; // a working connection resets the backoff
      setCounts(message.counts);
      swapRows(message.html);
    });
    socket.addEventListener("close", (event) => {
      if (event.code === FORBIDDEN) {
        setStatus("logged out: reload to log in");
        return;
      }
      setStatus("reconnecting");
      const wait = delay * (0.8 + Math.random() * 0.4); // jitter: not all tabs at once
      delay = Math.min(delay * 2, MAX_DELAY);
      setTimeout(connect, wait);
    });
  }

  connect();
})();
