// Weight sliders: show the value as it moves, and (debounced) ask the API how many
// tenants the new weight would move, before anything is applied.
(() => {
  "use strict";
  const DEBOUNCE_MS = 150;
  for (const form of document.querySelectorAll("form.weight-form")) {
    const slider = form.querySelector("input[type=range]");
    const value = form.querySelector("output.weight-value");
    const preview = form.querySelector(".preview");
    let timer = 0;
    let asked = 0;
    slider.addEventListener("input", () => {
      value.textContent = slider.value;
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const mine = ++asked;
        try {
          const url = `${form.dataset.preview}?weight=${encodeURIComponent(slider.value)}`;
          const response = await fetch(url, { credentials: "same-origin" });
          const body = await response.json();
          if (mine !== asked) return; // a newer position has been asked about since
          if (!response.ok) throw new Error(body.error ? body.error.message : response.status);
          preview.textContent =
            `${body.moving} of ${body.tenants} tenant${body.tenants === 1 ? "" : "s"} would move`;
          preview.dataset.moving = String(body.moving);
        } catch (error) {
          if (mine === asked) preview.textContent = `no preview: ${error.message}`;
        }
      }, DEBOUNCE_MS);
    });
  }
})();
