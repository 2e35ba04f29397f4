// Tokens: copy the new secret. navigator.clipboard needs a secure context (HTTPS or
// localhost); elsewhere the text is selected so the operator can press Ctrl+C.
(() => {
  "use strict";
  const button = document.getElementById("copy-token");
  if (!button) return;
  const code = document.getElementById(button.dataset.target);
  const status = document.getElementById("copy-status");
  const say = (text) => { if (status) status.textContent = text; };

  function select() {
    const range = document.createRange();
    range.selectNodeContents(code);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    code.focus();
  }

  button.addEventListener("click", async () => {
    try {
      if (!navigator.clipboard) throw new Error("no clipboard API");
      await navigator.clipboard.writeText(code.textContent.trim());
      say("Copied.");
    } catch (err) {
      select();
      say("Selected: press Ctrl+C (⌘C) to copy.");
    }
  });
})();
