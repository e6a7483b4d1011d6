// Metrion dashboard: charts from the page's own JSON, the filter bar, and the log row details.
"use strict";

const PALETTE = ["#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#64748b", "#ec4899"];
const data = JSON.parse(document.getElementById("page-data")?.textContent || "null");

function money(v) {
  if (v === null || v === undefined) return "—";
  if (v === 0 || Math.abs(v) >= 1) return "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
  return "$" + v.toFixed(Math.abs(v) >= 0.01 ? 4 : 6);
}
function compact(v) {
  return Intl.NumberFormat("en-US", { notation: "compact", maximumFractionDigits: 1 }).format(v);
}
function label(bucket) {  // "2026-11-24T20" → "24 Nov 20:00"; "2026-11-24" → "24 Nov"
  const [day, hour] = bucket.split("T");
  const d = new Date(day + "T00:00:00Z");
  const text = d.toLocaleDateString("en-GB", { day: "numeric", month: "short", timeZone: "UTC" });
  return hour === undefined ? text : `${text} ${hour}:00`;
}
function base(stacked, ticks) {
  return {
    responsive: true, maintainAspectRatio: false, animation: false,
    interaction: { mode: "index", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 10, boxHeight: 10 } } },
    scales: {
      x: { stacked, grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 14 } },
      y: { stacked, beginAtZero: true, ticks: { callback: ticks || compact }, grid: { color: "#eef0f4" } },
    },
  };
}
function series(name, values, i, extra) {
  const color = PALETTE[i % PALETTE.length];
  return { label: name, data: values, backgroundColor: color, borderColor: color, ...extra };
}

function spark(datasets) {
  return {
    type: "line",
    data: { labels: data.labels, datasets: datasets.map(([values, i]) =>
      series("", values, i, { pointRadius: 0, borderWidth: 1.5, tension: .3 })) },
    options: { responsive: true, maintainAspectRatio: false, animation: false, events: [],
      plugins: { legend: { display: false }, tooltip: { enabled: false } },
      scales: { x: { display: false }, y: { display: false, beginAtZero: true } } },
  };
}

const CHARTS = {
  spark_requests: () => spark([[data.requests.successes, 2], [data.requests.errors, 4]]),
  spark_cost: () => spark([[data.labels.map((_, t) =>
    Object.values(data.cost_by_model).reduce((sum, values) => sum + values[t], 0)), 0]]),
  spark_requesters: () => spark([[data.requesters, 5]]),
  requests: () => ({
    type: "bar",
    data: { labels: data.labels.map(label), datasets: [
      series("Successes", data.requests.successes, 2), series("Errors", data.requests.errors, 4)] },
    options: base(true),
  }),
  tokens: () => ({
    type: "line",
    data: { labels: data.labels.map(label), datasets: [
      series("Input", data.tokens.input, 0, { fill: true, backgroundColor: "rgba(79,70,229,.18)", pointRadius: 0, tension: .3 }),
      series("Output", data.tokens.output, 1, { fill: true, backgroundColor: "rgba(14,165,233,.18)", pointRadius: 0, tension: .3 }),
      series("Cached", data.tokens.cached, 2, { pointRadius: 0, tension: .3, borderDash: [4, 3] })] },
    options: base(false),
  }),
  cost_by_model: () => ({
    type: "bar",
    data: { labels: data.labels.map(label),
      datasets: Object.entries(data.cost_by_model).map(([model, values], i) => series(model, values, i)) },
    options: base(true, money),
  }),
  top_models: () => ({
    type: "bar",
    data: { labels: data.top_models.map((r) => r.model),
      datasets: [series("Requests", data.top_models.map((r) => r.requests), 0, { borderRadius: 4 })] },
    options: { ...base(false), indexAxis: "y", plugins: { legend: { display: false } },
      scales: { x: { beginAtZero: true, ticks: { callback: compact } }, y: { grid: { display: false }, ticks: {
        callback(value) { const name = this.getLabelForValue(value); return name.length > 22 ? name.slice(0, 21) + "…" : name; },
      } } } },
  }),
  latency: () => ({
    type: "line",
    data: { labels: data.labels.map(label), datasets: ["p50", "p95", "p99"].map((p, i) =>
      series(p, data.series[p], i, { pointRadius: 0, tension: .25, spanGaps: true })).concat([
      series("Average TTFB", data.series.ttfb_avg, 6, { pointRadius: 0, borderDash: [4, 3], spanGaps: true })]) },
    options: base(false, (v) => `${compact(v)} ms`),
  }),
  histogram: () => ({
    type: "bar",
    data: { labels: data.histogram.map((b) => `${compact(b.from_ms)}–${compact(b.to_ms)} ms`),
      datasets: [series("Requests", data.histogram.map((b) => b.requests), 0, { borderRadius: 3 })] },
    options: { ...base(false), plugins: { legend: { display: false } } },
  }),
  errors: () => ({
    type: "bar",
    data: { labels: data.labels.map(label),
      datasets: Object.entries(data.series).map(([name, values], i) => series(name, values, i + 3)) },
    options: base(true),
  }),
};

function drawCharts() {
  if (!window.Chart) return;
  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.color = "#687086";
  for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
    new Chart(canvas, CHARTS[canvas.dataset.chart]());
  }
}

function filterBar() {
  const form = document.querySelector("form.filters");
  if (!form) return;
  const period = form.elements.period;
  const show = () => form.classList.toggle("preset", period.value !== "custom");
  show();
  form.addEventListener("change", (event) => {
    show();
    if (event.target.name !== "since" && event.target.name !== "until" && period.value !== "custom") form.requestSubmit();
  });
  form.addEventListener("submit", () => {  // keep the URL short: leave out what is not chosen
    for (const field of form.elements) {
      if (field.name && (!field.value || (period.value !== "custom" && (field.name === "since" || field.name === "until")))) field.disabled = true;
    }
  });
}

function rowDetails() {
  const dialog = document.getElementById("row-detail");
  if (!dialog) return;
  const open = (tr) => {
    const row = data.rows[Number(tr.dataset.row)];
    const list = dialog.querySelector("dl");
    list.replaceChildren();
    for (const [key, value] of Object.entries(row)) {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = key;
      dd.textContent = value === null ? "—" : key === "cost_usd" ? money(value) : String(value);
      list.append(dt, dd);
    }
    dialog.querySelector("h2").textContent = `Request ${row.id}`;
    dialog.showModal();
  };
  for (const tr of document.querySelectorAll("tr[data-row]")) {
    tr.addEventListener("click", () => open(tr));
    tr.addEventListener("keydown", (event) => { if (event.key === "Enter") open(tr); });
  }
}

document.addEventListener("DOMContentLoaded", () => { filterBar(); drawCharts(); rowDetails(); });
