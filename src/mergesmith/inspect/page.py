"""The report as one self-contained HTML page: findings first, then heatmaps (layer x model pair
cosine, layer x model norm), per-layer line plots, the kept-mass curve and the spectra.

Everything is inline (the report JSON, the CSS and a small script drawing SVG), so the page opens
from disk with no network. When the script has drawn every plot it sets `data-rendered` on <body>
to the number of plots, which the browser test reads.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from mergesmith.inspect.report import write_text

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 26px 0 6px; }
.sub { color: #666; margin: 0 0 12px; }
#findings { background: #fff7e0; border: 1px solid #e8c55a; border-radius: 6px; padding: 10px 10px 10px 30px; }
#findings li { margin: 4px 0; }
.grid { display: flex; flex-wrap: wrap; gap: 18px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; background: #fff; }
.card h3 { font-size: 14px; margin: 0 0 4px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.key span { display: inline-block; margin-right: 14px; } .key i { display: inline-block; width: 12px; height: 12px;
  margin-right: 4px; vertical-align: -1px; border-radius: 2px; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var R = JSON.parse(document.getElementById("report-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"];
  var drawn = 0;
  function el(tag, attrs, parent, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined) { e.textContent = text; }
    if (parent) { parent.appendChild(e); }
    return e;
  }
  function svgIn(id, w, h) {
    var host = document.getElementById(id);
    var s = el("svg", {width: w, height: h, viewBox: "0 0 " + w + " " + h, "class": "plot"});
    host.appendChild(s);
    return s;
  }
  function fmt(v, d) { return v === null || v === undefined ? "-" : Number(v).toFixed(d); }
  var models = R.models, K = models.length, layers = R.layers;
  var pairs = [];
  for (var i = 0; i < K; i++) { for (var j = i + 1; j < K; j++) { pairs.push([i, j]); } }
  function short(n) { var p = String(n).split("/"); return p[p.length - 1] || n; }

  function diverging(v, m) {  // -m blue .. 0 white .. +m red
    if (v === null) { return "#ccc"; }
    var t = Math.max(-1, Math.min(1, v / m));
    var a = Math.round(255 * (1 - Math.abs(t)));
    return t >= 0 ? "rgb(255," + a + "," + a + ")" : "rgb(" + a + "," + a + ",255)";
  }
  function sequential(v, m) {  // 0 white .. m dark green
    if (v === null) { return "#ccc"; }
    var t = Math.max(0, Math.min(1, v / m));
    return "rgb(" + Math.round(255 - 220 * t) + "," + Math.round(255 - 120 * t) + "," + Math.round(255 - 200 * t) + ")";
  }

  function heatmap(id, cols, value, color, legend) {
    var cw = Math.max(28, Math.min(70, 520 / Math.max(1, cols.length))), ch = Math.max(8, Math.min(22, 440 / Math.max(1, layers.length)));
    var left = 46, top = 64, w = left + cw * cols.length + 20, h = top + ch * layers.length + 30;
    var s = svgIn(id, Math.max(w, 300), h);
    cols.forEach(function (c, x) {
      el("text", {x: left + x * cw + cw / 2, y: top - 8, "text-anchor": "start",
        transform: "rotate(-35 " + (left + x * cw + cw / 2) + " " + (top - 8) + ")"}, s, c);
    });
    layers.forEach(function (L, y) {
      if (layers.length <= 40 || y % 2 === 0) { el("text", {x: left - 6, y: top + y * ch + ch * 0.7, "text-anchor": "end"}, s, L.index); }
      cols.forEach(function (c, x) {
        var v = value(L, x);
        var r = el("rect", {x: left + x * cw, y: top + y * ch, width: cw - 1, height: ch - 1, fill: color(v), "class": "cell"}, s);
        el("title", {}, r, "layer " + L.index + ", " + c + ": " + fmt(v, 4));
      });
    });
    el("text", {x: left, y: h - 8}, s, legend);
    drawn++;
  }

  function linePlot(id, title, series, opts) {
    var w = 360, h = 232, l = 48, r = 10, t = 22, b = 50;
    var s = svgIn(id, w, h);
    el("text", {x: l, y: 14, "font-weight": "bold"}, s, title);
    var xs = opts.xs, vals = [];
    series.forEach(function (sr) { sr.values.forEach(function (v) { if (v !== null && isFinite(v)) { vals.push(v); } }); });
    var lo = opts.ymin !== undefined ? opts.ymin : Math.min.apply(null, vals.concat([0]));
    var hi = opts.ymax !== undefined ? opts.ymax : Math.max.apply(null, vals.concat([lo + 1e-9]));
    if (hi - lo < 1e-12) { hi = lo + 1; }
    var x0 = xs[0], x1 = xs[xs.length - 1] === x0 ? x0 + 1 : xs[xs.length - 1];
    function X(v) { return l + (w - l - r) * (v - x0) / (x1 - x0); }
    function Y(v) { return h - b - (h - t - b) * (v - lo) / (hi - lo); }
    el("line", {x1: l, y1: h - b, x2: w - r, y2: h - b, stroke: "#999"}, s);
    el("line", {x1: l, y1: t, x2: l, y2: h - b, stroke: "#999"}, s);
    [lo, (lo + hi) / 2, hi].forEach(function (v) {
      el("text", {x: l - 4, y: Y(v) + 4, "text-anchor": "end"}, s, opts.yfmt ? opts.yfmt(v) : fmt(v, 3));
      el("line", {x1: l, y1: Y(v), x2: w - r, y2: Y(v), stroke: "#eee"}, s);
    });
    el("text", {x: l, y: h - b + 14}, s, String(x0));
    el("text", {x: w - r, y: h - b + 14, "text-anchor": "end"}, s, String(xs[xs.length - 1]));
    el("text", {x: (l + w) / 2, y: h - b + 14, "text-anchor": "middle"}, s, opts.xlabel || "layer");
    var lx = l;
    series.slice(0, 8).forEach(function (sr) {  // legend
      el("line", {x1: lx, y1: h - 10, x2: lx + 14, y2: h - 10, stroke: sr.color, "stroke-width": 2, "stroke-dasharray": sr.dash || ""}, s);
      var label = el("text", {x: lx + 17, y: h - 6}, s, sr.name.length > 14 ? sr.name.slice(0, 13) + "\u2026" : sr.name);
      lx += 24 + 6.2 * label.textContent.length;
    });
    series.forEach(function (sr) {
      var d = "", pen = false;
      sr.values.forEach(function (v, k) {
        if (v === null || !isFinite(v)) { pen = false; return; }
        d += (pen ? "L" : "M") + X(xs[k]).toFixed(1) + " " + Y(v).toFixed(1) + " ";
        pen = true;
        var c = el("circle", {cx: X(xs[k]), cy: Y(v), r: 2.2, fill: sr.color}, s);
        el("title", {}, c, sr.name + " @ " + xs[k] + ": " + fmt(v, 4));
      });
      if (d) { el("path", {d: d, fill: "none", stroke: sr.color, "stroke-width": 1.6, "stroke-dasharray": sr.dash || "", "class": "series"}, s); }
    });
    drawn++;
  }

  var xs = layers.map(function (L) { return L.index; });
  var pairNames = pairs.map(function (p) { return (p[0] + 1) + "\u00d7" + (p[1] + 1); });

  // heatmaps
  if (pairs.length) {
    var cmax = 0.05;
    layers.forEach(function (L) { pairs.forEach(function (p) { var c = L.cosine[p[0]][p[1]]; if (c !== null) { cmax = Math.max(cmax, Math.abs(c)); } }); });
    heatmap("heat-cosine", pairNames, function (L, x) { return L.cosine[pairs[x][0]][pairs[x][1]]; },
      function (v) { return diverging(v, cmax); }, "blue " + (-cmax).toFixed(2) + " \u2026 white 0 \u2026 red +" + cmax.toFixed(2));
  } else {
    document.getElementById("heat-cosine").textContent = "one task model: no pairs to compare";
  }
  var nmax = 1e-12;
  layers.forEach(function (L) { L.norm.forEach(function (v) { if (v !== null) { nmax = Math.max(nmax, v); } }); });
  heatmap("heat-norm", models.map(function (m, i) { return "[" + (i + 1) + "]"; }), function (L, x) { return L.norm[x]; },
    function (v) { return sequential(v, nmax); }, "white 0 \u2026 green " + nmax.toPrecision(3) + " (task-vector norm / base norm)");

  // line plots per layer
  function perModel(get) {
    return models.map(function (m, i) { return {name: "[" + (i + 1) + "] " + short(m), color: COLORS[i % 10], values: layers.map(function (L) { return get(L, i); })}; });
  }
  linePlot("line-norm", "task-vector norm / base norm", perModel(function (L, i) { return L.norm[i]; }), {xs: xs, ymin: 0});
  if (pairs.length) {
    linePlot("line-cosine", "task-vector cosine (pairs)", pairs.map(function (p, k) {
      return {name: pairNames[k], color: COLORS[k % 10], values: layers.map(function (L) { return L.cosine[p[0]][p[1]]; })};
    }), {xs: xs});
  }
  linePlot("line-conflict", "sign conflict (share of magnitude)", perModel(function (L, i) { return L.sign_conflict.per_model[i]; }).concat([
    {name: "all models", color: "#000", dash: "4 3", values: layers.map(function (L) { return L.sign_conflict.rate; })}]),
    {xs: xs, ymin: 0, yfmt: function (v) { return (100 * v).toFixed(0) + "%"; }});
  if (R.overall.kept_mass) {
    linePlot("line-kept", "magnitude kept at the recipe's density", perModel(function (L, i) { return L.kept_mass ? L.kept_mass.kept[i] : null; }),
      {xs: xs, ymin: 0, ymax: 1, yfmt: function (v) { return (100 * v).toFixed(0) + "%"; }});
  }
  if (R.overall.spectra) {
    linePlot("line-energy", "energy in the top " + R.settings.rank + " directions", perModel(function (L, i) { return L.spectra ? L.spectra.energy_top[i] : null; }).concat([
      {name: "sum", color: "#000", dash: "4 3", values: layers.map(function (L) { return L.spectra ? L.spectra.energy_top_sum : null; })}]),
      {xs: xs, ymin: 0, ymax: 1, yfmt: function (v) { return (100 * v).toFixed(0) + "%"; }});
  }
  if (R.overall.merged) {
    linePlot("line-toward", "how far the merge moved towards each model", perModel(function (L, i) { return L.merged ? L.merged.toward[i] : null; }), {xs: xs});
  }
  var curve = R.settings.curve;
  linePlot("curve-kept", "magnitude kept by a density cut (whole model)", models.map(function (m, i) {
    return {name: "[" + (i + 1) + "] " + short(m), color: COLORS[i % 10], values: curve.map(function (d) { return R.overall.kept_mass_curve[String(d)][i]; })};
  }), {xs: curve, ymin: 0, ymax: 1, xlabel: "density", yfmt: function (v) { return (100 * v).toFixed(0) + "%"; }});

  // spectra: the matrices of one layer (a select picks it), log scale
  var byLayer = {}, layerKeys = [];
  R.spectra.forEach(function (e) {
    var key = e.layer === null ? "other" : String(e.layer);
    if (!byLayer[key]) { byLayer[key] = []; layerKeys.push(key); }
    byLayer[key].push(e);
  });
  var host = document.getElementById("spectra");
  function drawSpectra(key) {
    host.innerHTML = "";
    (byLayer[key] || []).forEach(function (e, n) {
      var card = document.createElement("div");
      card.className = "card";
      card.id = "spectrum-" + n;
      host.appendChild(card);
      var name = e.tensor.split(".").slice(-2).join(".");
      var series = e.sigma.map(function (sg, i) { return {name: "[" + (i + 1) + "]", color: COLORS[i % 10], values: sg.map(function (v) { return v > 0 ? Math.log10(v) : null; })}; });
      series.push({name: "sum", color: "#000", dash: "4 3", values: e.sigma_sum.map(function (v) { return v > 0 ? Math.log10(v) : null; })});
      var n0 = Math.max.apply(null, series.map(function (s) { return s.values.length; }));
      var idx = []; for (var q = 1; q <= n0; q++) { idx.push(q); }
      series.forEach(function (s) { while (s.values.length < n0) { s.values.push(null); } });
      linePlot(card.id, name + " " + e.shape.join("\u00d7") + " (rank90 " + e.rank90.map(function (r) { return r === null ? ">" + e.sketch_rank : r; }).join("/") + ", sum " + (e.rank90_sum === null ? ">" + e.sketch_rank : e.rank90_sum) + ")",
        series, {xs: idx, xlabel: "singular value #", yfmt: function (v) { return "1e" + v.toFixed(1); }});
    });
  }
  if (layerKeys.length) {
    var sel = document.getElementById("spectra-layer");
    layerKeys.forEach(function (k) { var o = document.createElement("option"); o.value = k; o.textContent = k === "other" ? "embeddings / head" : "layer " + k; sel.appendChild(o); });
    var mid = layerKeys.filter(function (k) { return k !== "other"; });
    sel.value = mid.length ? mid[Math.floor(mid.length / 2)] : layerKeys[0];
    sel.addEventListener("change", function () { drawSpectra(sel.value); });
    drawSpectra(sel.value);
  } else {
    host.textContent = "no matrices";
  }
  var key = document.getElementById("key");
  models.forEach(function (m, i) {
    var sp = document.createElement("span"); var sw = document.createElement("i");
    sw.style.background = COLORS[i % 10]; sp.appendChild(sw); sp.appendChild(document.createTextNode("[" + (i + 1) + "] " + m)); key.appendChild(sp);
  });
  Array.prototype.forEach.call(document.querySelectorAll(".card"), function (c) {
    if (!c.querySelector("svg") && !c.textContent.trim()) { c.parentNode.removeChild(c); }  // plots with no data
  });
  document.body.setAttribute("data-rendered", String(drawn));
})();
"""

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mergesmith inspect: @@TITLE@@</title>
<style>@@CSS@@</style></head>
<body>
<h1>mergesmith inspect</h1>
<p class="sub">base <b>@@BASE@@</b> &middot; @@COUNT@@ task model(s)@@MERGED@@ &middot; @@TENSORS@@ tensors, @@ELEMENTS@@ elements</p>
<h2>Findings</h2>
<ul id="findings">@@FINDINGS@@</ul>
<div class="key" id="key"></div>
<h2>Per module type (whole model)</h2>
@@MODULES@@
<h2>Heatmaps</h2>
<div class="grid">
<div class="card"><h3>task-vector cosine, layer &times; model pair</h3><div id="heat-cosine"></div></div>
<div class="card"><h3>task-vector norm / base norm, layer &times; model</h3><div id="heat-norm"></div></div>
</div>
<h2>Per layer</h2>
<div class="grid">
<div class="card" id="line-norm"></div><div class="card" id="line-cosine"></div><div class="card" id="line-conflict"></div>
<div class="card" id="line-kept"></div><div class="card" id="line-energy"></div><div class="card" id="line-toward"></div>
<div class="card" id="curve-kept"></div>
</div>
<h2>Spectra <select id="spectra-layer"></select></h2>
<p class="sub">singular values of each task vector ([n]) and of their sum (dashed), from a randomized SVD sketch;
rank90 = directions holding 90% of the energy</p>
<div class="grid" id="spectra"></div>
<script type="application/json" id="report-data">@@DATA@@</script>
<script>@@SCRIPT@@</script>
</body></html>
"""


def _modules_table(report: dict[str, Any]) -> str:
    k = len(report["models"])
    head = "".join(f"<th>norm [{i + 1}]</th>" for i in range(k)) + "<th>sign conflict</th><th>elements</th>"
    rows = []
    for name, g in report["overall"]["modules"].items():
        cells = "".join(f"<td>{'-' if n is None else f'{n:.4f}'}</td>" for n in g["norm"])
        rate = g["sign_conflict"]["rate"]
        cells += f"<td>{'-' if rate is None else f'{rate:.1%}'}</td><td>{g['numel']:,}</td>"
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f'<table id="modules"><tr><th>module</th>{head}</tr>{"".join(rows)}</table>'


def render_page(report: dict[str, Any]) -> str:
    data = json.dumps(report, allow_nan=False).replace("</", "<\\/")
    merged = f" &middot; merge <b>{html.escape(report['merged'])}</b>" if report["merged"] else ""
    parts = {
        "@@TITLE@@": html.escape(", ".join(report["models"])),
        "@@CSS@@": CSS,
        "@@BASE@@": html.escape(report["base"]),
        "@@COUNT@@": str(len(report["models"])),
        "@@MERGED@@": merged,
        "@@TENSORS@@": f"{report['tensors']:,}",
        "@@ELEMENTS@@": f"{report['elements']:,}",
        "@@FINDINGS@@": "".join(f"<li>{html.escape(s)}</li>" for s in report["findings"]),
        "@@MODULES@@": _modules_table(report),
        "@@SCRIPT@@": SCRIPT,
        "@@DATA@@": data,
    }
    return re.sub("@@[A-Z]+@@", lambda m: parts[m.group(0)], TEMPLATE)  # one pass: no value is re-read


def write_page(report: dict[str, Any], path: str) -> None:
    write_text(path, render_page(report))
