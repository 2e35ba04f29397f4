// The dashboard's charts: one small uPlot per series, refreshed from the section's
// data-source (JSON columns: t, then one array per series) once per step.
(() => {
  "use strict";
  const section = document.getElementById("charts");
  if (!section || typeof uPlot === "undefined") return;
  const status = document.getElementById("charts-status");
  const figures = [...section.querySelectorAll("figure.chart")];
  const charts = {};
  const SPARSE = new Set(["p95_ms", "wake_ms", "wakes"]);
  window.tenementCharts = charts; // read by the browser tests

  function make(figure, data) {
    const holder = figure.querySelector(".chart-plot");
    const series = figure.dataset.series;
    const opts = {
      width: Math.max(holder.clientWidth, 200),
      height: 120,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max || 0, 1)] } },
      axes: [{ space: 60 }, { size: 44 }],
      // Sparse series (a wake, a step's p95) are single points between gaps: dots, or
      // they would not show at all.
      series: [{}, { label: series, stroke: "#2563eb", fill: "rgba(37, 99, 235, 0.12)",
                     width: 1.5, spanGaps: false,
                     points: { show: SPARSE.has(series), size: 5, fill: "#2563eb" } }],
    };
    charts[series] = new uPlot(opts, data, holder);
  }

  async function refresh() {
    let payload;
    try {
      const response = await fetch(section.dataset.source, { credentials: "same-origin" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      payload = await response.json();
    } catch (e) {
      if (status) status.textContent = "charts unavailable";
      return 10000;
    }
    for (const figure of figures) {
      const series = figure.dataset.series;
      const data = [payload.t, payload[series] || []];
      if (charts[series]) charts[series].setData(data);
      else make(figure, data);
    }
    if (status) {
      status.textContent = payload.t.length
        ? `one point per ${payload.step_s} s`
        : "no data yet: the first point comes after one step";
    }
    return Math.max(payload.step_s, 1) * 1000;
  }

  async function loop() {
    const wait = await refresh();
    setTimeout(loop, wait);
  }
  window.addEventListener("resize", () => {
    for (const figure of figures) {
      const chart = charts[figure.dataset.series];
      const holder = figure.querySelector(".chart-plot");
      if (chart) chart.setSize({ width: Math.max(holder.clientWidth, 200), height: 120 });
    }
  });
  loop();
})();
