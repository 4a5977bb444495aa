"""The HTML of the dashboard's daskml page (:mod:`daskml_scale.dashboard`): plain HTML, CSS
and a little JavaScript that reads ``daskml/data.json`` every second and draws SVG; nothing
is fetched from elsewhere, so the page works on a cluster without internet access."""

from __future__ import annotations

__all__ = ["PAGE"]

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>daskml: training</title>
<style>
 body { font-family: sans-serif; margin: 16px 24px; color: #222; }
 h1 { font-size: 20px; margin: 0 0 8px 0; }
 .muted { color: #777; font-size: 13px; }
 .bar { width: 360px; height: 14px; background: #eee; border-radius: 3px; display: inline-block;
        vertical-align: middle; margin-right: 8px; }
 .bar > div { height: 100%; background: #3b7dd8; border-radius: 3px; }
 .charts { display: flex; flex-wrap: wrap; gap: 16px; margin: 12px 0; }
 .chart { border: 1px solid #ddd; border-radius: 4px; padding: 6px; }
 .chart h3 { font-size: 14px; margin: 0 0 4px 4px; }
 table { border-collapse: collapse; font-size: 13px; margin-top: 6px; }
 td, th { border-bottom: 1px solid #eee; padding: 3px 10px; text-align: right; }
 td:first-child, th:first-child { text-align: left; }
 select { margin-left: 8px; }
</style>
</head>
<body>
<h1>daskml_scale.fit <span id="fitname" class="muted"></span>
 <select id="fits" title="fits seen by this scheduler"></select></h1>
<div id="status" class="muted">waiting for a fit...</div>
<div style="margin-top:8px"><span class="bar"><div id="epochbar" style="width:0%"></div></span>
 <span id="epochtext"></span></div>
<div style="margin-top:4px"><span class="bar"><div id="roundbar" style="width:0%"></div></span>
 <span id="roundtext"></span></div>
<div id="charts" class="charts"></div>
<h3 style="font-size:15px;margin-bottom:0">Workers (last epoch)</h3>
<table id="workers"><tr><th>worker</th><th>rows/s</th><th>steps/s</th></tr></table>
<div id="traffic" class="muted" style="margin-top:8px"></div>
<script>
"use strict";
const COLORS = {train: "#1f77b4", validation: "#ff7f0e"};
let chosen = null;
const fitsSelect = document.getElementById("fits");
fitsSelect.addEventListener("change", () => { chosen = fitsSelect.value || null; refresh(); });

function svgEl(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const k in attrs) el.setAttribute(k, attrs[k]);
  return el;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a >= 1000) return Math.round(v).toLocaleString("en-US");
  if (a >= 1) return v.toFixed(2);
  return v.toPrecision(3);
}

function chart(name, series) {
  const W = 360, H = 220, L = 52, R = 10, T = 10, B = 30;
  const box = document.createElement("div");
  box.className = "chart";
  box.dataset.metric = name;
  const h = document.createElement("h3");
  h.textContent = name;
  box.appendChild(h);
  const svg = svgEl("svg", {width: W, height: H});
  const all = [].concat(...Object.values(series).map(s => s.filter(v => v !== null)));
  const n = Math.max(...Object.values(series).map(s => s.length), 1);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (hi === lo) { hi = lo + 1; lo = lo - 1; }
  const x = i => L + (n === 1 ? (W - L - R) / 2 : i * (W - L - R) / (n - 1));
  const y = v => T + (hi - v) * (H - T - B) / (hi - lo);
  svg.appendChild(svgEl("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafafa", stroke: "#ccc"}));
  for (let k = 0; k <= 4; k++) {
    const v = lo + k * (hi - lo) / 4;
    svg.appendChild(svgEl("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e5e5e5"}));
    const t = svgEl("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end", "font-size": 10, fill: "#555"});
    t.textContent = fmt(v);
    svg.appendChild(t);
  }
  const ticks = Math.min(n, 10);
  for (let k = 0; k < ticks; k++) {
    const i = Math.round(k * (n - 1) / Math.max(ticks - 1, 1));
    const t = svgEl("text", {x: x(i), y: H - B + 14, "text-anchor": "middle", "font-size": 10, fill: "#555"});
    t.textContent = i + 1;
    svg.appendChild(t);
  }
  const xl = svgEl("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", "font-size": 11, fill: "#333"});
  xl.textContent = "epoch";
  svg.appendChild(xl);
  let ly = T + 14;
  for (const label in series) {
    const pts = series[label].map((v, i) => v === null ? null : [x(i), y(v)]).filter(p => p);
    const color = COLORS[label];
    if (pts.length > 1) {
      svg.appendChild(svgEl("polyline", {points: pts.map(p => p.join(",")).join(" "), fill: "none",
                                         stroke: color, "stroke-width": 2,
                                         "stroke-dasharray": label === "validation" ? "6,3" : ""}));
    }
    for (const p of pts) svg.appendChild(svgEl("circle", {cx: p[0], cy: p[1], r: 3, fill: color, class: "point"}));
    const lt = svgEl("text", {x: W - R - 6, y: ly, "text-anchor": "end", "font-size": 11, fill: color});
    lt.textContent = label;
    svg.appendChild(lt);
    ly += 14;
  }
  box.appendChild(svg);
  return box;
}

function curves(history) {
  const names = [];
  for (const k in history) {
    const base = k.startsWith("val_") ? k.slice(4) : k;
    if (/^(allreduce|ps|gossip|averaging)_/.test(base) || names.includes(base)) continue;
    names.push(base);
  }
  names.sort((a, b) => (a !== "loss") - (b !== "loss"));
  return names.map(name => {
    const s = {};
    if (history[name]) s.train = history[name];
    if (history["val_" + name]) s.validation = history["val_" + name];
    return chart(name, s);
  });
}

function render(data) {
  const fits = data.fits || [];
  const options = fits.map(f => f.fit).reverse();
  if (fitsSelect.options.length !== options.length) {
    fitsSelect.innerHTML = "";
    for (const f of options) { const o = document.createElement("option"); o.value = f; o.textContent = f; fitsSelect.appendChild(o); }
    if (chosen) fitsSelect.value = chosen;
  }
  const fit = data.fit;
  if (!fit || !fit.fit) return;
  document.getElementById("fitname").textContent = fit.fit;
  const info = fit.info || {};
  const ago = Math.max(0, data.now - fit.updated);
  document.getElementById("status").textContent =
    `${fit.status} - strategy ${info.strategy || "?"}, ${info.workers || (fit.workers || []).length} workers, ` +
    `${(info.train_rows || 0).toLocaleString("en-US")} training rows; last update ${ago.toFixed(1)} s ago`;
  const epochs = fit.epochs || 1, rounds = fit.rounds || 1;
  const done = fit.status !== "running";
  document.getElementById("epochbar").style.width = (100 * fit.epoch / epochs) + "%";
  document.getElementById("epochtext").textContent = `epoch ${Math.min(fit.epoch + (done ? 0 : 1), epochs)}/${epochs}` + (done ? " - done" : "");
  document.getElementById("roundbar").style.width = (100 * Math.min(fit.round, rounds) / rounds) + "%";
  document.getElementById("roundtext").textContent = `round ${fit.round}/${rounds}` +
    (fit.round_loss !== undefined && fit.round_loss !== null ? ` (loss ${fmt(fit.round_loss)})` : "");
  const charts = document.getElementById("charts");
  charts.innerHTML = "";
  for (const c of curves(fit.history || {})) charts.appendChild(c);
  const last = (fit.rates || [])[fit.rates.length - 1];
  const table = document.getElementById("workers");
  table.innerHTML = "<tr><th>worker</th><th>rows/s</th><th>steps/s</th></tr>";
  if (last) {
    for (const w in last.workers || {}) {
      const r = last.workers[w];
      const tr = document.createElement("tr");
      tr.innerHTML = `<td>${w}</td><td>${fmt(r.rows_per_s)}</td><td>${fmt(r.steps_per_s)}</td>`;
      table.appendChild(tr);
    }
    const t = last.traffic || {};
    const parts = [`epoch ${last.epoch + 1}: ${fmt(last.seconds)} s, ${fmt(last.rows_per_s)} rows/s in all`];
    if (t.pushes_per_s !== undefined) parts.push(`parameter server: ${fmt(t.pushes_per_s)} pushes/s`);
    if (t.reduces_per_s !== undefined) parts.push(`all-reduce: ${fmt(t.reduces_per_s)} reduces/s`);
    if (t.mb_sent_per_s !== undefined) parts.push(`${fmt(t.mb_sent_per_s)} MB/s sent per worker`);
    document.getElementById("traffic").textContent = parts.join(" - ");
  }
  document.body.dataset.epochs = String(fit.epoch);
}

async function refresh() {
  try {
    const url = "daskml/data.json" + (chosen ? "?fit=" + encodeURIComponent(chosen) : "");
    const base = location.pathname.endsWith("/") ? "../" : "";
    const resp = await fetch(base + url, {cache: "no-store"});
    render(await resp.json());
  } catch (e) {
    document.getElementById("status").textContent = "cannot read data.json: " + e;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
