// Instance detail: the live log tail.
//
// New lines come from the API's SSE stream (/api/logs/stream). That stream starts "from
// now" on a fresh connection (EventSource cannot send Last-Event-ID the first time), so
// on every (re)connect we also fetch the newest stored lines and append those after the
// last one shown: nothing printed between page load and connect is lost. SSE lines that
// arrive during that fetch are held back so the tail stays in id order.
//
// Scrolling up pauses following (#tail-status "paused"); lines keep being collected and
// are added on resume (scroll to the bottom, or #tail-toggle).
(() => {
  "use strict";
  const MAX_LINES = 2000; // in the DOM and in the paused backlog
  const FILL_LIMIT = 1000; // the API's largest page
  const log = document.getElementById("log-tail");
  const status = document.getElementById("tail-status");
  const toggle = document.getElementById("tail-toggle");
  if (!log || !status || !toggle || !window.EventSource) return;

  const key = log.dataset.instance;
  let lastId = Number(log.dataset.lastId) || 0;
  let following = true;
  let backlog = []; // lines received while paused
  let filling = false;
  let held = []; // SSE lines received while the gap is being filled

  const atBottom = () => log.scrollHeight - log.scrollTop - log.clientHeight < 8;
  const scrollToEnd = () => { log.scrollTop = log.scrollHeight; };

  function setFollowing(on) {
    following = on;
    status.textContent = on ? "following" : "paused";
    status.classList.toggle("paused", !on);
    // Screen readers would otherwise keep announcing lines the user scrolled away from.
    log.setAttribute("aria-live", on ? "polite" : "off");
    if (on) {
      const lines = backlog;
      backlog = [];
      render(lines);
      scrollToEnd();
    }
    updateToggle();
  }

  function updateToggle() {
    const waiting = backlog.length ? ` (${backlog.length} new)` : "";
    toggle.textContent = following ? "Pause" : `Resume${waiting}`;
    toggle.setAttribute("aria-pressed", following ? "false" : "true");
  }

  function lineItem(line) {
    const li = document.createElement("li");
    li.className = `log-line ${line.stream}`;
    li.dataset.id = line.id;
    const time = document.createElement("time");
    time.dateTime = line.time;
    time.textContent = new Date(line.time).toISOString().slice(11, 19);
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = line.text; // never innerHTML: log lines are untrusted
    li.append(time, " ", text);
    return li;
  }

  function render(lines) {
    if (!lines.length) return;
    const empty = document.getElementById("no-lines");
    if (empty) empty.remove();
    const fragment = document.createDocumentFragment();
    for (const line of lines) fragment.append(line.gap ? gapItem() : lineItem(line));
    log.append(fragment);
    while (log.children.length > MAX_LINES) log.firstElementChild.remove();
    if (following) scrollToEnd();
  }

  function gapItem() {
    const li = document.createElement("li");
    li.className = "log-line gap";
    li.textContent = "… more lines arrived than fit here; use log search to see them all";
    return li;
  }

  function accept(lines) {
    const fresh = lines.filter((line) => line.gap || line.id > lastId);
    for (const line of fresh) if (!line.gap) lastId = line.id;
    if (following) {
      render(fresh);
    } else {
      backlog = backlog.concat(fresh).slice(-MAX_LINES);
      updateToggle();
    }
  }

  async function fillGap() {
    filling = true;
    try {
      const url = `${log.dataset.searchUrl}?instance=${encodeURIComponent(key)}&limit=${FILL_LIMIT}&order=newest`;
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.ok) {
        const results = (await response.json()).filter((l) => l.id > lastId).reverse();
        if (results.length === FILL_LIMIT) results.unshift({ gap: true });
        accept(results);
      }
    } catch (err) {
      // The stream still delivers new lines; only the ones in between may be missing.
    } finally {
      filling = false;
      const waiting = held;
      held = [];
      accept(waiting);
    }
  }

  function connect() {
    const source = new EventSource(`${log.dataset.streamUrl}?instance=${encodeURIComponent(key)}`);
    source.addEventListener("open", () => { fillGap(); });
    source.addEventListener("message", (event) => {
      const line = JSON.parse(event.data);
      if (filling) held.push(line);
      else accept([line]);
    });
    // EventSource reconnects by itself after a dropped connection; on each open the gap
    // is filled again.
  }

  log.addEventListener("scroll", () => {
    const bottom = atBottom();
    if (following && !bottom) setFollowing(false);
    else if (!following && bottom) setFollowing(true);
  }, { passive: true });
  toggle.addEventListener("click", () => setFollowing(!following));

  scrollToEnd();
  updateToggle();
  connect();
})();
