// The live memory page: polls /api/stats/history and draws it with uPlot.
// An API key, if the server wants one, comes as /dashboard/#key=... (kept for the tab).
"use strict";

const state = { samples: [], events: [], charts: {}, windowS: 300, lastT: 0, polls: 0 };
window.dashboard = state; // read by tests/test_dashboard.py

const key = new URLSearchParams(location.hash.slice(1)).get("key") ||
  sessionStorage.getItem("accordion-key");
if (key) sessionStorage.setItem("accordion-key", key);

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const MiB = 1 << 20;
const bytes = (n) => n == null ? "" : n >= 1 << 30 ? (n / (1 << 30)).toFixed(2) + " GiB"
  : (n / MiB).toFixed(1) + " MiB";

async function get(path) {
  const response = await fetch(path, { headers: key ? { Authorization: "Bearer " + key } : {} });
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}

// Load and unload events as vertical lines on every chart.
const eventLines = {
  hooks: {
    draw: [(u) => {
      const { ctx, bbox } = u;
      ctx.save();
      ctx.strokeStyle = css("--event");
      ctx.setLineDash([4, 4]);
      for (const e of state.events) {
        const x = u.valToPos(e.t, "x", true);
        if (x < bbox.left || x > bbox.left + bbox.width) continue;
        ctx.beginPath(); ctx.moveTo(x, bbox.top); ctx.lineTo(x, bbox.top + bbox.height);
        ctx.stroke();
        ctx.fillStyle = css("--event");
        ctx.fillText(`${e.kind} ${e.model}`, x + 4, bbox.top + 12);
      }
      ctx.restore();
    }],
  },
};

function chart(el, series, yFormat, height = 220, yRange = undefined) {
  const opts = {
    width: el.clientWidth || 600, height, plugins: [eventLines],
    series: [{}, ...series],
    axes: [{ stroke: css("--muted") }, { stroke: css("--muted"), values: (u, v) => v.map(yFormat), size: 90 }],
    scales: { x: { time: true }, y: yRange ? { range: yRange } : {} },
  };
  return new uPlot(opts, [[], ...series.map(() => [])], el);
}

function line(label, color, fill) {
  return { label, stroke: color, width: 1.5, fill, points: { show: false } };
}

function memoryChart(model) {
  const box = document.createElement("div");
  box.innerHTML = `<h3>${model}</h3>`;
  const el = document.createElement("div");
  box.appendChild(el);
  document.getElementById("memory").appendChild(box);
  // Drawn largest first, each filled to zero: the smaller ones paint over, which stacks.
  const c = chart(el, [
    line("KV allocated (empty part)", css("--empty"), css("--empty")),
    line("KV cached", css("--cached"), css("--cached")),
    line("KV used", css("--used"), css("--used")),
    line("weights", css("--weights"), css("--weights")),
    { ...line("weights + KV budget", css("--budget")), dash: [6, 4] },
  ], bytes, 260, (u) => {
    // Scaled to what is held: the budget line shows once memory comes near it (a budget
    // of 18 GiB beside 40 MiB of KV would flatten everything else).
    const top = Math.max(1, ...u.data[1].filter((v) => v != null));
    return [0, top * 1.25];
  });
  return { box, chart: c, model };
}

function series(pick) {
  return state.samples.map(pick);
}

function sum(sample, f) {
  return Object.values(sample.models).reduce((a, m) => a + (f(m) ?? 0), 0);
}

function redraw() {
  const t = series((s) => s.t);
  const models = new Set(state.samples.flatMap((s) => Object.keys(s.models)));
  document.getElementById("no-models").hidden = models.size > 0;
  for (const model of models) {
    state.charts[model] ||= memoryChart(model);
    const at = (f) => series((s) => s.models[model] ? f(s.models[model]) : null);
    state.charts[model].chart.setData([
      t,
      at((m) => m.weights_bytes + m.kv.allocated_bytes),
      at((m) => m.weights_bytes + m.kv.used_bytes + m.kv.cached_bytes),
      at((m) => m.weights_bytes + m.kv.used_bytes),
      at((m) => m.weights_bytes),
      at((m) => m.weights_bytes + m.kv.budget_bytes),
    ]);
  }
  state.requests.setData([t, series((s) => sum(s, (m) => m.active)),
    series((s) => sum(s, (m) => m.waiting))]);
  state.tokens.setData([t, series((s) => sum(s, (m) => m.evaluated_per_s)),
    series((s) => sum(s, (m) => m.generated_per_s))]);
  const worst = (f) => series((s) => Math.max(0, ...Object.values(s.models).map((m) => f(m) ?? 0)));
  state.ttft.setData([t, worst((m) => m.ttft_p50), worst((m) => m.ttft_p95)]);
  state.process.setData([t, series((s) => s.process.rss), series((s) => s.process.available)]);
  table(state.samples.at(-1));
}

function table(sample) {
  const body = document.querySelector("#ps tbody");
  body.innerHTML = "";
  for (const [name, m] of Object.entries(sample?.models ?? {})) {
    const row = document.createElement("tr");
    const cells = [name, bytes(m.weights_bytes), m.kv.allocated_tokens, m.kv.used_tokens,
      m.kv.cached_tokens, bytes(m.kv.allocated_bytes), bytes(m.kv.budget_bytes), m.active,
      m.waiting, m.preemptions];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
}

// Batch jobs (accordion batch, over Ray or not, and the Batch API's): /api/batches.
function batches(jobs) {
  const box = document.getElementById("batches");
  if (!jobs.length) return;
  box.replaceChildren(...jobs.map((j) => {
    const row = document.createElement("div");
    row.className = "batch";
    const label = document.createElement("span");
    const failed = j.failed ? ` · ${j.failed} failed` : "";
    label.textContent = `${j.name} (${j.kind}, ${j.model}): ${j.state} · ${j.done} / ${j.total}${failed}`;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${100 * j.done / Math.max(j.total, 1)}%`;
    bar.appendChild(fill);
    row.append(label, bar);
    return row;
  }));
}

function take(history) {
  const fresh = history.samples.filter((s) => s.t > state.lastT);
  state.samples.push(...fresh);
  if (fresh.length) state.lastT = fresh.at(-1).t;
  const seen = new Set(state.events.map((e) => e.t + e.kind + e.model));
  state.events.push(...history.events.filter((e) => !seen.has(e.t + e.kind + e.model)));
  const since = state.lastT - state.windowS;
  state.samples = state.samples.filter((s) => s.t >= since);
  state.events = state.events.filter((e) => e.t >= since);
}

async function poll() {
  try {
    const seconds = state.lastT ? 5 : state.windowS;
    take(await get(`/api/stats/history?seconds=${seconds}`));
    redraw();
    if (state.polls++ % 3 === 0) batches((await get("/api/batches")).batches);
    document.getElementById("status").textContent =
      `live · ${state.samples.length} samples · ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("status").textContent = `no data: ${error.message}`;
  }
  setTimeout(poll, 1000);
}

function start() {
  const y = (v) => v.toFixed(v < 10 ? 1 : 0);
  state.requests = chart(document.getElementById("requests"),
    [line("active", css("--a")), line("waiting", css("--b"))], y);
  state.tokens = chart(document.getElementById("tokens"),
    [line("evaluated", css("--a")), line("generated", css("--b"))], y);
  state.ttft = chart(document.getElementById("ttft"),
    [line("p50 (s)", css("--a")), line("p95 (s)", css("--b"))], (v) => v.toFixed(2));
  state.process = chart(document.getElementById("process"),
    [line("RSS", css("--a")), line("available", css("--b"))], bytes);
  document.getElementById("window").addEventListener("change", (e) => {
    state.windowS = Number(e.target.value);
    state.lastT = 0;
    state.samples = [];
  });
  window.addEventListener("resize", () => {
    for (const c of [state.requests, state.tokens, state.ttft, state.process,
      ...Object.values(state.charts).map((m) => m.chart)]) {
      c.setSize({ width: c.root.parentElement.clientWidth, height: c.height });
    }
  });
  poll();
}

start();
