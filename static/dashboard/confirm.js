// Destructive actions ask first: a form with data-confirm="message", or the button that
// submits it (one form can hold several actions), submits only if the operator confirms.
// Delegated, so forms swapped in by live updates are covered too.
(() => {
  "use strict";
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement)) return;
    const button = event.submitter;
    const message = (button && button.dataset.confirm) || form.dataset.confirm;
    if (message && !window.confirm(message)) event.preventDefault();
  });
})();
