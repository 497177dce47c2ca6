// furnace dashboard: a small canvas line plot. Each series is {id, label, color, x, y}
// with optional lo/hi arrays (a translucent band drawn under the line: the confidence
// intervals the evals mode reports; a null bound leaves its point out of the band). Long series are reduced to a min/max pair per pixel column when drawn, so
// 100k points cost what a few thousand do.
"use strict";

const FurnacePlot = (() => {
  const PAD = { left: 52, right: 10, top: 8, bottom: 22 };

  function niceStep(range, target) {
    const raw = range / Math.max(1, target);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const m = raw / p;
    return (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10) * p;
  }

  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
    if (a >= 100) return v.toFixed(0);
    if (a >= 1) return v.toFixed(2).replace(/\.?0+$/, "");
    return v.toPrecision(2);
  }

  // Indices of the points to draw: all of them when few, otherwise per pixel column the
  // first, the smallest, the largest and the last.
  function reduce(xs, ys, x0, x1, width) {
    const n = xs.length;
    if (n <= width * 2) return null;
    const out = [];
    let col = -1, lo = -1, hi = -1, first = -1, last = -1;
    const flush = () => {
      if (first < 0) return;
      const set = [first, lo, hi, last].filter((v, i, a) => a.indexOf(v) === i).sort((a, b) => a - b);
      for (const i of set) out.push(i);
    };
    for (let i = 0; i < n; i++) {
      const c = Math.floor(((xs[i] - x0) / (x1 - x0 || 1)) * width);
      if (c !== col) {
        flush();
        col = c; first = lo = hi = last = i;
      } else {
        last = i;
        if (ys[i] < ys[lo]) lo = i;
        if (ys[i] > ys[hi]) hi = i;
      }
    }
    flush();
    return out;
  }

  class Plot {
    constructor(parent, title) {
      this.root = document.createElement("div");
      this.root.className = "plot";
      this.root.dataset.metric = title;
      const t = document.createElement("div");
      t.className = "title";
      t.textContent = title;
      this.canvas = document.createElement("canvas");
      this.tip = document.createElement("div");
      this.tip.className = "tip";
      this.legend = document.createElement("div");
      this.legend.className = "legend";
      this.root.append(t, this.canvas, this.tip, this.legend);
      parent.appendChild(this.root);
      this.series = [];
      this.xLabel = "step";
      this.pending = false;
      this.canvas.addEventListener("mousemove", (e) => this.hover(e));
      this.canvas.addEventListener("mouseleave", () => { this.tip.style.display = "none"; });
      if (window.ResizeObserver) new ResizeObserver(() => this.draw()).observe(this.canvas);
    }

    setSeries(series) {
      this.series = series;
      this.schedule();
    }

    // What the x axis counts ("step", or "shard" for evals experiments).
    setXLabel(label) {
      if (label === this.xLabel) return;
      this.xLabel = label;
      this.schedule();
    }

    schedule() {
      if (this.pending) return;
      this.pending = true;
      requestAnimationFrame(() => { this.pending = false; this.draw(); });
    }

    // Points drawn (for tests): the number of series with data.
    get drawnSeries() { return this.series.filter((s) => s.x.length > 0).length; }

    bounds() {
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const s of this.series) {
        for (let i = 0; i < s.x.length; i++) {
          const y = s.y[i];
          if (!Number.isFinite(y)) continue;
          x0 = Math.min(x0, s.x[i]); x1 = Math.max(x1, s.x[i]);
          const lo = s.lo && Number.isFinite(s.lo[i]) ? s.lo[i] : y, hi = s.hi && Number.isFinite(s.hi[i]) ? s.hi[i] : y;
          y0 = Math.min(y0, lo, y); y1 = Math.max(y1, hi, y);
        }
      }
      if (!Number.isFinite(x0)) return null;
      if (x0 === x1) { x0 -= 1; x1 += 1; }
      if (y0 === y1) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
      const pad = (y1 - y0) * 0.05;
      return { x0, x1, y0: y0 - pad, y1: y1 + pad };
    }

    draw() {
      const c = this.canvas, dpr = window.devicePixelRatio || 1;
      const w = c.clientWidth, h = c.clientHeight;
      if (!w || !h) return;
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      const g = c.getContext("2d");
      g.setTransform(dpr, 0, 0, dpr, 0, 0);
      g.clearRect(0, 0, w, h);
      const css = getComputedStyle(document.documentElement);
      const muted = css.getPropertyValue("--muted").trim(), grid = css.getPropertyValue("--grid").trim();
      const b = this.bounds();
      this.frame = null;
      // What is drawn, for people's tools and tests: series and points.
      this.root.dataset.series = String(this.series.filter((s) => s.x.length).length);
      this.root.dataset.points = String(this.series.reduce((n, s) => n + s.x.length, 0));
      this.root.dataset.xLabel = this.xLabel;
      this.root.dataset.bands = "0";
      this.legend.replaceChildren(...this.series.filter((s) => s.x.length).map((s) => {
        const span = document.createElement("span");
        const i = document.createElement("i");
        i.style.background = s.color;
        span.append(i, document.createTextNode(s.label));
        return span;
      }));
      g.font = "11px system-ui, sans-serif";
      if (!b) {
        g.fillStyle = muted;
        g.fillText("no data yet", w / 2 - 30, h / 2);
        return;
      }
      const pw = w - PAD.left - PAD.right, ph = h - PAD.top - PAD.bottom;
      const X = (x) => PAD.left + ((x - b.x0) / (b.x1 - b.x0)) * pw;
      const Y = (y) => PAD.top + (1 - (y - b.y0) / (b.y1 - b.y0)) * ph;
      this.frame = { b, X, Y, pw, ph };
      g.strokeStyle = grid; g.fillStyle = muted; g.lineWidth = 1;
      const ys = niceStep(b.y1 - b.y0, ph / 40);
      // Enough decimals to tell neighbouring ticks apart.
      const digits = Math.max(0, Math.min(8, -Math.floor(Math.log10(ys))));
      const tick = (v) => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0 && ys < 1e-3) ? v.toExponential(1) : v.toFixed(digits));
      for (let v = Math.ceil(b.y0 / ys) * ys; v <= b.y1; v += ys) {
        const y = Math.round(Y(v)) + 0.5;
        g.beginPath(); g.moveTo(PAD.left, y); g.lineTo(w - PAD.right, y); g.stroke();
        g.fillText(tick(v), 4, y + 4);
      }
      const xs = Math.max(1, niceStep(b.x1 - b.x0, pw / 80));
      for (let v = Math.ceil(b.x0 / xs) * xs; v <= b.x1; v += xs) {
        const x = Math.round(X(v)) + 0.5;
        g.beginPath(); g.moveTo(x, PAD.top); g.lineTo(x, PAD.top + ph); g.stroke();
        g.fillText(fmt(v), x - 8, h - 6);
      }
      g.fillStyle = muted;
      // The x axis's name, in the corner under the y ticks (clear of the x ticks).
      g.fillText(this.xLabel, 4, h - 6);
      let bands = 0;
      for (const s of this.series) {
        if (!s.x.length) continue;
        const idx = reduce(s.x, s.y, b.x0, b.x1, pw);
        const at = idx ? (k) => idx[k] : (k) => k;
        const n = idx ? idx.length : s.x.length;
        if (s.lo && s.hi) {
          // The points with both bounds; one alone is drawn as an error bar.
          const pts = [];
          for (let k = 0; k < n; k++) { const i = at(k); if (Number.isFinite(s.lo[i]) && Number.isFinite(s.hi[i])) pts.push(i); }
          if (pts.length) {
            g.globalAlpha = 0.18; g.fillStyle = s.color; g.strokeStyle = s.color;
            if (pts.length === 1) {
              const i = pts[0], x = X(s.x[i]);
              g.globalAlpha = 0.5; g.lineWidth = 6; g.beginPath(); g.moveTo(x, Y(s.hi[i])); g.lineTo(x, Y(s.lo[i])); g.stroke();
            } else {
              g.beginPath();
              for (const i of pts) g.lineTo(X(s.x[i]), Y(s.hi[i]));
              for (let k = pts.length - 1; k >= 0; k--) g.lineTo(X(s.x[pts[k]]), Y(s.lo[pts[k]]));
              g.closePath(); g.fill();
            }
            g.globalAlpha = 1;
            bands++;
          }
        }
        g.strokeStyle = s.color; g.lineWidth = 1.6; g.beginPath();
        let started = false;
        for (let k = 0; k < n; k++) {
          const i = at(k);
          if (!Number.isFinite(s.y[i])) { started = false; continue; }
          const px = X(s.x[i]), py = Y(s.y[i]);
          if (started) g.lineTo(px, py); else { g.moveTo(px, py); started = true; }
        }
        g.stroke();
        if (n === 1) { g.fillStyle = s.color; g.beginPath(); g.arc(X(s.x[0]), Y(s.y[0]), 2.5, 0, 7); g.fill(); }
      }
      // The series drawn with an interval band (for people's tools and tests).
      this.root.dataset.bands = String(bands);
    }

    hover(e) {
      if (!this.frame) return;
      const r = this.canvas.getBoundingClientRect();
      const px = e.clientX - r.left;
      const { b, pw } = this.frame;
      const x = b.x0 + ((px - PAD.left) / pw) * (b.x1 - b.x0);
      const lines = [];
      for (const s of this.series) {
        if (!s.x.length) continue;
        let lo = 0, hi = s.x.length - 1;
        while (lo < hi) { const m = (lo + hi) >> 1; if (s.x[m] < x) lo = m + 1; else hi = m; }
        const i = lo > 0 && Math.abs(s.x[lo - 1] - x) < Math.abs(s.x[lo] - x) ? lo - 1 : lo;
        const band = s.lo && s.hi && Number.isFinite(s.lo[i]) && Number.isFinite(s.hi[i]) ? ` [${fmt(s.lo[i])}, ${fmt(s.hi[i])}]` : "";
        lines.push(`${s.label}: ${this.xLabel} ${s.x[i]} = ${fmt(s.y[i])}${band}`);
      }
      if (!lines.length) return;
      this.tip.textContent = lines.slice(0, 12).join("\n");
      this.tip.style.whiteSpace = "pre";
      this.tip.style.display = "block";
      this.tip.style.left = Math.min(px + 14, r.width - 160) + "px";
      this.tip.style.top = "28px";
    }
  }

  return { Plot, fmt };
})();
