// furnace dashboard: experiments, one experiment's runs with live plots and IC ops, a
// run's details, and a spec editor that starts experiments. Plain DOM, no framework; the
// data comes from the JSON API and the live event stream (/api/events).
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#main");
const PALETTE = ["#e8590c", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#e03131", "#5f3dc4", "#66a80f", "#c2255c"];
const colorOf = (id) => PALETTE[Math.abs(Number(id)) % PALETTE.length];
const PLOT_METRICS = ["loss", "eval_loss", "lr", "grad_norm"];
// What DPO and GRPO runs add to the plots and the runs table (TRL's metric names).
const KIND_METRICS = {
  dpo: { plot: ["rewards/accuracies", "rewards/margins", "eval_rewards/accuracies"], cols: [["rewards/accuracies", "Reward acc"], ["eval_rewards/accuracies", "Eval reward acc"]] },
  grpo: { plot: ["reward", "eval_reward", "completions/mean_length"], cols: [["reward", "Reward"], ["eval_reward", "Eval reward"]] },
};

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// One call to the API: JSON in and out; a 401 shows the login.
async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  if (r.status === 401 && path !== "/api/login") {
    showLogin();
    throw new ApiError(401, "log in first");
  }
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || r.statusText);
  return data;
}

// Builds an element: el("td", {class: "num", onclick: f}, child, "text", ...).
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "text") e.textContent = v;
    else if (k === "style") e.style.cssText = v; // CSSOM: allowed by the page's CSP, unlike a style attribute
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const fmtNum = (v) => (v === undefined || v === null || !Number.isFinite(v) ? "–"
  : Number.isInteger(v) && Math.abs(v) < 1e9 ? String(v)
  : Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : v.toFixed(4));
// Replaces the page's content (null and false children are left out).
const mount = (...nodes) => main().replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
const fmtTime = (s) => (s ? new Date(s * 1000).toLocaleString() : "–");
const statusBadge = (s) => el("span", { class: `status ${s}`, dataset: { status: s } }, s);
const knobText = (v) => (v === undefined ? "–" : typeof v === "string" ? v : JSON.stringify(v));
// An estimate with its interval: "0.712 ± 0.041 [0.671, 0.753]" (± the larger side).
const fmtInterval = (v, lo, hi) => {
  if (!Number.isFinite(v)) return "–";
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return fmtNum(v);
  const d = (x) => (Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toFixed(3));
  return `${d(v)} ± ${d(Math.max(hi - v, v - lo))} [${d(lo)}, ${d(hi)}]`;
};

function debounce(f, ms) {
  let t = null;
  return (...a) => { clearTimeout(t); t = setTimeout(() => f(...a), ms); };
}

// ---- live events -------------------------------------------------------------------

const live = { source: null, handlers: new Set() };

function connectEvents() {
  if (live.source) live.source.close();
  const es = new EventSource("/api/events");
  live.source = es;
  const badge = $("#live");
  es.onopen = () => { badge.textContent = "live"; badge.classList.add("on"); };
  es.onerror = () => { badge.textContent = "reconnecting…"; badge.classList.remove("on"); };
  for (const type of ["metric", "interval", "status", "op", "log", "progress"]) {
    es.addEventListener(type, (m) => {
      let ev;
      try { ev = JSON.parse(m.data); } catch (_) { return; }
      for (const h of live.handlers) h(ev);
    });
  }
}

// The page's handler of live events (replaced when the page changes).
function onEvents(handler) {
  live.handlers.clear();
  if (handler) live.handlers.add(handler);
}

// ---- login -------------------------------------------------------------------------

function showLogin() {
  onEvents(null);
  const err = el("div", { class: "err", id: "login-error" });
  const input = el("input", { type: "password", id: "login-token", autocomplete: "current-password", placeholder: "token", size: 40 });
  const submit = async (e) => {
    e.preventDefault();
    try {
      await api("/api/login", { method: "POST", body: { token: input.value } });
      $("#logout").hidden = false;
      connectEvents();
      route();
    } catch (x) { err.textContent = x.message; }
  };
  mount(
    el("h1", {}, "Log in"),
    el("p", { class: "muted" }, "This server needs its token (from --token-file or FURNACE_TOKEN where it was started)."),
    el("form", { class: "panel", id: "login-form", onsubmit: submit }, input, " ", el("button", { class: "primary", type: "submit" }, "Log in"), err),
  );
  input.focus();
}

// ---- experiments -------------------------------------------------------------------

async function pageExperiments() {
  const rows = await api("/api/summary");
  const body = el("tbody");
  for (const r of rows.slice().reverse()) {
    const e = r.experiment;
    const counts = Object.entries(r.by_status).map(([s, n]) => el("span", {}, statusBadge(s), ` ${n} `));
    const best = r.best ? `${fmtNum(r.best.value)}${r.best.metric !== "eval_loss" ? ` ${r.best.metric}` : ""} (run ${r.best.run_id})` : "–";
    body.append(el("tr", { dataset: { experiment: e.name } },
      el("td", {}, el("a", { href: `#/e/${encodeURIComponent(e.name)}` }, e.name)),
      el("td", {}, e.mode), el("td", {}, statusBadge(e.status)),
      el("td", { class: "num" }, r.runs), el("td", {}, counts),
      el("td", {}, fmtTime(e.created)), el("td", { class: "num" }, best)));
  }
  mount(
    el("h1", {}, "Experiments"),
    rows.length ? el("div", { class: "table-wrap" }, el("table", { id: "experiments" },
      el("thead", {}, el("tr", {}, ["Name", "Mode", "Status", "Runs", "By status", "Started", "Best (eval loss; evals: primary metric)"].map((h) => el("th", {}, h)))), body))
      : el("p", { class: "muted" }, "No experiments yet. ", el("a", { href: "#/new" }, "Start one"), " or run furnace run SPEC.toml."),
  );
  onEvents(debounce((ev) => { if (ev.type === "status" || ev.type === "op") route(); }, 500));
  ready();
}

// ---- adapters ----------------------------------------------------------------------

// The adapter registry: every run's final adapter and the PEFT adapters registered by path.
const ADAPTER_METRICS = ["eval_loss", "eval_reward", "eval_rewards/accuracies", "loss", "reward"];

async function pageAdapters() {
  const rows = await api("/api/adapters");
  const body = el("tbody");
  for (const a of rows.slice().reverse()) {
    const metrics = ADAPTER_METRICS.filter((m) => a.metrics && Number.isFinite(a.metrics[m])).slice(0, 3)
      .map((m) => el("div", {}, `${m} ${fmtNum(a.metrics[m])}`));
    const name = a.source === "run" && a.run_id !== null ? el("a", { href: `#/r/${a.run_id}` }, a.name) : a.name;
    const peft = a.peft || {};
    body.append(el("tr", { dataset: { adapter: a.name } },
      el("td", {}, name), el("td", {}, a.base), el("td", {}, a.source),
      el("td", { class: "num" }, peft.r ?? "–"), el("td", { class: "num" }, peft.lora_alpha ?? "–"),
      el("td", {}, metrics.length ? metrics : "–"),
      el("td", {}, a.tags.length ? a.tags.map((t) => el("span", { class: "status" }, t)) : "–"),
      el("td", {}, el("code", {}, a.path)), el("td", {}, fmtTime(a.created))));
  }
  mount(
    el("h1", {}, "Adapters"),
    rows.length ? el("div", { class: "table-wrap" }, el("table", { id: "adapters" },
      el("thead", {}, el("tr", {}, ["Name", "Base", "Source", "Rank", "Alpha", "Final metrics", "Tags", "Path", "Registered"].map((h) => el("th", {}, h)))), body))
      : el("p", { class: "muted" }, "No adapters yet: every finished run registers its adapter; furnace adapters register PATH adds others."),
  );
  onEvents(debounce((ev) => { if (ev.type === "status") route(); }, 1000));
  ready();
}

// ---- one experiment ----------------------------------------------------------------

function experimentPage(name) {
  const st = {
    name, table: null, series: {}, selected: null, sort: { key: "id", dir: 1 }, filter: "", status: "visible",
    plots: {}, log: [], editing: null, confirming: null,
  };

  const root = el("div", { id: "experiment" });
  const tableWrap = el("div", { class: "table-wrap" });
  const opsWrap = el("div", { class: "table-wrap" });
  const clonePanel = el("div", { id: "clone-panel" });
  const plotsEl = el("div", { class: "plots", id: "plots" });
  const logEl = el("pre", { class: "log", id: "log" });
  const header = el("div");
  const filterInput = el("input", { type: "search", id: "filter", placeholder: "filter runs (any cell)", oninput: (e) => { st.filter = e.target.value.toLowerCase(); renderTable(); } });
  const statusSel = el("select", { id: "status-filter", onchange: (e) => { st.status = e.target.value; renderTable(); } },
    ...[["visible", "not deleted"], ["all", "all"], ["active", "new / ongoing"], ["completed", "completed"], ["stopped", "stopped"], ["failed", "failed"], ["deleted", "deleted"]]
      .map(([v, t]) => el("option", { value: v }, t)));
  root.append(header,
    el("div", { class: "toolbar" }, filterInput, statusSel,
      el("button", { type: "button", onclick: () => { st.selected = null; renderTable(); renderPlots(); } }, "Plot all"),
      el("button", { type: "button", onclick: () => { st.selected = new Set(); renderTable(); renderPlots(); } }, "Plot none")),
    tableWrap, clonePanel, el("h2", {}, "Metrics"), plotsEl, el("h2", {}, "Ops"), opsWrap, el("h2", {}, "Log"), logEl);

  const runsShown = () => st.table.runs.filter((r) => {
    if (st.status === "visible" && r.status === "deleted") return false;
    if (st.status === "active" && !(r.status === "new" || r.status === "ongoing")) return false;
    if (!["visible", "all", "active"].includes(st.status) && r.status !== st.status) return false;
    if (!st.filter) return true;
    return rowCells(r).some((c) => String(c).toLowerCase().includes(st.filter));
  });
  const isSelected = (id) => st.selected === null || st.selected.has(id);
  const isEvals = () => !!st.table && st.table.experiment.mode === "evals";
  // The metrics plotted: an evals experiment's own (primary first), a training run's usual four.
  const kindMetrics = (part) => (st.table && st.table.kinds ? st.table.kinds : []).flatMap((k) => (KIND_METRICS[k] ? KIND_METRICS[k][part] : []));
  // GRPO runs have no eval loss (they are evaluated by their rewards).
  const onlyGrpo = () => !!st.table && (st.table.kinds || []).length > 0 && st.table.kinds.every((k) => k === "grpo");
  const plotMetrics = () => (isEvals() ? (st.table.metric_names || []).slice(0, 16)
    : PLOT_METRICS.filter((m) => !(onlyGrpo() && m === "eval_loss")).concat(kindMetrics("plot")));
  // One plot per metric plotted, in order (made when the table says which).
  function ensurePlots() {
    const want = plotMetrics();
    const have = Object.keys(st.plots);
    if (want.length === have.length && want.every((m, i) => m === have[i])) return false;
    plotsEl.replaceChildren();
    st.plots = {};
    for (const m of want) st.plots[m] = new FurnacePlot.Plot(plotsEl, m + (isEvals() && m === st.table.primary ? " (primary)" : ""));
    for (const m of want) st.plots[m].root.dataset.metric = m;
    return true;
  }
  const metric = (r, name, field) => (r.metrics && r.metrics[name] ? r.metrics[name][field] : undefined);

  function columns() {
    if (isEvals()) return evalsColumns();
    const cols = [
      { key: "id", label: "Run", num: true, get: (r) => r.id },
      { key: "status", label: "Status", get: (r) => r.status },
      { key: "steps", label: "Steps", num: true, get: (r) => r.steps_done },
      { key: "chunks", label: "Chunks", num: true, get: (r) => r.chunks_done },
    ];
    for (const k of st.table.knobs) cols.push({ key: `knob:${k}`, label: k, knob: k, get: (r) => (r.knobs ? r.knobs[k] : undefined) });
    cols.push(
      { key: "loss", label: "Loss", num: true, get: (r) => metric(r, "loss", "last") },
    );
    if (!onlyGrpo()) {
      cols.push(
        { key: "eval", label: "Eval loss", num: true, get: (r) => metric(r, "eval_loss", "last") },
        { key: "best", label: "Best eval", num: true, get: (r) => metric(r, "eval_loss", "min") },
      );
    }
    for (const [m, label] of kindMetrics("cols")) cols.push({ key: `metric:${m}`, label, num: true, get: (r) => metric(r, m, "last") });
    cols.push({ key: "parent", label: "Parent", num: true, get: (r) => r.parent_id });
    return cols;
  }
  // An evals experiment: shards, each metric with its interval, why a run stopped.
  function evalsColumns() {
    const cols = [
      { key: "id", label: "Run", num: true, get: (r) => r.id },
      { key: "status", label: "Status", get: (r) => r.status },
      { key: "steps", label: "Shards", num: true, get: (r) => r.steps_done },
    ];
    for (const k of st.table.knobs) cols.push({ key: `knob:${k}`, label: k, knob: k, get: (r) => (r.knobs ? r.knobs[k] : undefined) });
    for (const m of st.table.metric_names || []) {
      const bounded = (st.table.bounded || []).includes(m);
      cols.push({
        key: `metric:${m}`, label: m + (m === st.table.primary ? " ★" : ""), num: true, metric: m, bounded,
        get: (r) => metric(r, m, "last"),
        text: (r) => (bounded ? fmtInterval(metric(r, m, "last"), metric(r, m, "lower"), metric(r, m, "upper")) : fmtNum(metric(r, m, "last"))),
      });
    }
    cols.push(
      { key: "reason", label: "Note", get: (r) => r.reason || r.error || "" },
      { key: "parent", label: "Parent", num: true, get: (r) => r.parent_id },
    );
    return cols;
  }
  const rowCells = (r) => columns().map((c) => (c.text ? c.text(r) : knobText(c.get(r))));

  function renderHeader() {
    const e = st.table.experiment;
    header.replaceChildren(
      el("h1", {}, `Experiment ${e.name} `, statusBadge(e.status)),
      el("div", { class: "muted" }, `${e.mode} · started ${fmtTime(e.created)} · ${st.table.runs.length} runs${isEvals() && st.table.primary ? ` · primary metric ${st.table.primary}` : ""} · spec ${e.spec_path}`),
    );
  }

  function actionButtons(r) {
    const box = el("span", { class: "actions" });
    const op = async (body, what) => {
      try {
        await api("/api/ops", { method: "POST", body });
        log(`op ${what} run ${r.id}: submitted (applied at its next ${isEvals() ? "shard boundary" : "optimizer step"})`);
        refresh();
      } catch (x) { log(`op ${what} run ${r.id} refused: ${x.message}`); alertBox(x.message); }
    };
    if (st.confirming === r.id) {
      box.append(el("span", { class: "confirm" }, `Delete run ${r.id}?`),
        el("button", { type: "button", class: "danger", dataset: { action: "confirm-delete", run: r.id }, onclick: () => { st.confirming = null; op({ run: r.id, op: "delete" }, "delete"); } }, "Delete"),
        el("button", { type: "button", dataset: { action: "cancel-delete", run: r.id }, onclick: () => { st.confirming = null; renderTable(); } }, "Cancel"));
      return box;
    }
    if (r.status === "new" || r.status === "ongoing") box.append(el("button", { type: "button", dataset: { action: "stop", run: r.id }, onclick: () => op({ run: r.id, op: "stop" }, "stop") }, "Stop"));
    if (r.status === "stopped") box.append(el("button", { type: "button", dataset: { action: "resume", run: r.id }, onclick: () => op({ run: r.id, op: "resume" }, "resume") }, "Resume"));
    if (r.status !== "deleted") {
      box.append(el("button", { type: "button", dataset: { action: "clone", run: r.id }, onclick: () => openClone(r) }, "Clone"));
      box.append(el("button", { type: "button", class: "danger", dataset: { action: "delete", run: r.id }, onclick: () => { st.confirming = r.id; renderTable(); } }, "Delete"));
    }
    return box;
  }

  function renderTable() {
    const cols = columns();
    let runs = runsShown();
    const col = cols.find((c) => c.key === st.sort.key) || cols[0];
    runs = runs.slice().sort((a, b) => {
      const x = col.get(a), y = col.get(b);
      if (x === y) return a.id - b.id;
      if (x === undefined || x === null) return 1;
      if (y === undefined || y === null) return -1;
      return (typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y))) * st.sort.dir;
    });
    const head = el("tr", {}, el("th", {}, el("input", { type: "checkbox", title: "plot every run", checked: st.selected === null, onchange: (e) => { st.selected = e.target.checked ? null : new Set(); renderTable(); renderPlots(); } })),
      cols.map((c) => el("th", {
        class: `sortable ${c.num ? "num" : ""} ${st.sort.key === c.key ? (st.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : ""}`,
        dataset: { sort: c.key },
        onclick: () => { st.sort = { key: c.key, dir: st.sort.key === c.key ? -st.sort.dir : 1 }; renderTable(); },
      }, c.label)), el("th", {}, "Actions"));
    const body = el("tbody");
    for (const r of runs) {
      const pct = r.total_steps ? Math.min(100, (100 * r.steps_done) / r.total_steps) : 0;
      const check = el("input", { type: "checkbox", checked: isSelected(r.id), dataset: { plot: r.id }, onchange: (e) => {
        if (st.selected === null) st.selected = new Set(st.table.runs.map((x) => x.id));
        if (e.target.checked) st.selected.add(r.id); else st.selected.delete(r.id);
        renderPlots();
      } });
      const cells = cols.map((c) => {
        const v = c.get(r);
        if (c.key === "id") return el("td", { class: "num" }, el("a", { href: `#/r/${r.id}`, style: `color:${colorOf(r.id)}` }, `${r.id}`));
        if (c.key === "status") return el("td", { title: r.error || r.reason || "" }, statusBadge(r.status));
        if (c.metric) return el("td", { class: "num", dataset: { cell: c.key } }, c.text(r));
        if (c.key === "reason") return el("td", { class: "reason", dataset: { cell: "reason" }, title: v }, v);
        if (c.key === "steps") return el("td", { class: "num", dataset: { cell: "steps" } }, el("span", { class: "bar" }, el("span", { style: `width:${pct}%` })), `${r.steps_done}/${r.total_steps || "?"}`);
        if (c.key === "chunks") return el("td", { class: "num", dataset: { cell: "chunks" } }, `${r.chunks_done}/${r.total_chunks || "?"}`);
        if (c.key === "parent") return el("td", { class: "num" }, v ? el("a", { href: `#/r/${v}` }, `${v}${r.warm ? " (warm)" : ""}`) : "–");
        if (c.num) return el("td", { class: "num", dataset: { cell: c.key } }, fmtNum(v));
        return el("td", {}, knobText(v));
      });
      body.append(el("tr", { dataset: { run: r.id, status: r.status }, class: isSelected(r.id) ? "selected-row" : "" }, el("td", {}, check), cells, el("td", {}, actionButtons(r))));
    }
    tableWrap.replaceChildren(el("table", { id: "runs" }, el("thead", {}, head), body));
  }

  function renderOps() {
    const ops = st.table.ops.slice().reverse();
    if (!ops.length) { opsWrap.replaceChildren(el("p", { class: "muted", style: "margin:8px" }, "No ops yet.")); return; }
    opsWrap.replaceChildren(el("table", { id: "ops" },
      el("thead", {}, el("tr", {}, ["Op", "Run", "Kind", "From", "Status", "Step", "Result"].map((h) => el("th", {}, h)))),
      el("tbody", {}, ops.map((o) => el("tr", { dataset: { op: o.id, status: o.status } },
        el("td", { class: "num" }, o.id), el("td", { class: "num" }, o.run_id),
        el("td", {}, o.kind.op + (o.kind.set && o.kind.set.length ? ` ${o.kind.set.join(" ")}` : "") + (o.kind.warm ? " (warm)" : "")),
        el("td", {}, o.source), el("td", {}, statusBadge(o.status)), el("td", { class: "num" }, o.applied_step ?? "–"),
        el("td", {}, o.message || (o.new_run_id ? `run ${o.new_run_id}` : "")))))));
  }

  function renderPlots() {
    ensurePlots();
    for (const m of plotMetrics()) {
      const list = [];
      for (const r of st.table.runs) {
        if (r.status === "deleted" || !isSelected(r.id)) continue;
        const s = st.series[r.id] && st.series[r.id][m];
        if (!s) continue;
        list.push({ id: r.id, label: `run ${r.id}`, color: colorOf(r.id), x: s.step, y: s.value, lo: s.lower, hi: s.upper });
      }
      st.plots[m].setXLabel(isEvals() ? "shard" : "step");
      st.plots[m].setSeries(list);
    }
  }

  function log(line) {
    st.log.push(`${new Date().toLocaleTimeString()}  ${line}`);
    if (st.log.length > 300) st.log.splice(0, st.log.length - 300);
    logEl.textContent = st.log.join("\n");
    logEl.scrollTop = logEl.scrollHeight;
  }

  function alertBox(msg) {
    clonePanel.replaceChildren(el("div", { class: "panel err", id: "op-error" }, msg));
  }

  // Clone-modify: the parent's knobs pre-filled, extra settings, warm start.
  function openClone(r) {
    st.editing = r.id;
    const inputs = {};
    const errs = {};
    const fields = Object.entries(r.knobs || {}).map(([k, v]) => {
      inputs[k] = el("input", { type: "text", name: k, value: knobText(v), dataset: { knob: k, original: knobText(v) }, size: 30 });
      errs[k] = el("div", { class: "err", dataset: { errorFor: k } });
      return el("div", { class: "field" }, el("label", { for: `knob-${k}` }, k), el("div", {}, inputs[k], errs[k]));
    });
    const evals = isEvals();
    const extra = el("textarea", { id: "clone-extra", rows: 3, placeholder: evals
      ? "more settings, one per line (sections rag, prompt, generator, judge): rag.chunk_size=256, prompt.few_shot=2, generator.temperature=0.2"
      : "more settings, one per line: trainer.max_steps=200" });
    const extraErr = el("div", { class: "err", id: "clone-error" });
    const warm = el("input", { type: "checkbox", id: "clone-warm" });
    const submit = async (e) => {
      e.preventDefault();
      for (const x of Object.values(errs)) x.textContent = "";
      extraErr.textContent = "";
      const set = [];
      for (const [k, i] of Object.entries(inputs)) if (i.value.trim() !== i.dataset.original) set.push(`${k}=${i.value.trim()}`);
      for (const line of extra.value.split("\n").map((l) => l.trim()).filter(Boolean)) set.push(line);
      try {
        const isWarm = !evals && warm.checked;
        const res = await api("/api/ops", { method: "POST", body: { run: r.id, op: "clone", set, warm: isWarm } });
        log(`op ${res.op_id} clone of run ${r.id} (${set.join(", ") || "no changes"}${isWarm ? ", warm" : ""}): pending until the next ${evals ? "shard boundary" : "optimizer step"}`);
        st.editing = null;
        clonePanel.replaceChildren(el("div", { class: "panel ok-msg", id: "clone-ok" }, `Clone of run ${r.id} submitted (op ${res.op_id}); it appears in the table when applied.`));
        refresh();
      } catch (x) {
        // The server names the setting it refused: show the message next to that field.
        const key = Object.keys(inputs).find((k) => x.message.includes(k));
        (key ? errs[key] : extraErr).textContent = x.message;
      }
    };
    clonePanel.replaceChildren(el("form", { class: "panel", id: "clone-form", onsubmit: submit },
      el("h2", { style: "margin-top:0" }, `Clone run ${r.id} with changes`),
      fields.length ? fields : el("p", { class: "muted" }, "This run has no knobs; add settings below."),
      el("div", { class: "field" }, el("label", { for: "clone-extra" }, "other settings"), el("div", {}, extra)),
      evals ? el("p", { class: "muted", id: "clone-evals-note" }, "An evals clone is a new pipeline scored from shard 1 (no warm start); it may change the rag, prompt, generator and judge sections.")
        : el("div", { class: "field" }, el("label", { for: "clone-warm" }, "warm start"), el("div", {}, warm, " continue the parent's adapter, optimizer state and data position (same rank, targets and base)")),
      extraErr,
      el("div", { class: "toolbar" }, el("button", { type: "submit", class: "primary", id: "clone-submit" }, "Clone"),
        el("button", { type: "button", onclick: () => { st.editing = null; clonePanel.replaceChildren(); } }, "Cancel"))));
    clonePanel.scrollIntoView({ block: "nearest" });
  }

  async function loadTable() {
    st.table = await api(`/api/experiments/${encodeURIComponent(name)}/table`);
  }

  async function loadSeries() {
    const names = plotMetrics();
    if (!names.length) { st.series = {}; return; }
    const s = await api(`/api/experiments/${encodeURIComponent(name)}/series?names=${names.map(encodeURIComponent).join(",")}&points=1000`);
    st.series = s.runs;
  }

  const refresh = debounce(async () => {
    try {
      const before = plotMetrics().join(",");
      await loadTable();
      // An evals experiment's first shard names its metrics: fetch their series.
      if (plotMetrics().join(",") !== before) await loadSeries();
      renderHeader(); renderTable(); renderOps(); renderPlots();
    } catch (x) { log(`refresh failed: ${x.message}`); }
  }, 250);

  function onEvent(ev) {
    if (ev.experiment !== name) return;
    if (ev.type === "metric") {
      const runSeries = (st.series[ev.run_id] ||= {});
      const s = (runSeries[ev.name] ||= { step: [], value: [] });
      const n = s.step.length;
      if (n && s.step[n - 1] >= ev.step) {
        // A step redone after a resume replaces what was there.
        const i = s.step.findIndex((x) => x >= ev.step);
        s.step.length = i; s.value.length = i;
        if (s.lower) { s.lower.length = Math.min(s.lower.length, i); s.upper.length = Math.min(s.upper.length, i); }
      }
      s.step.push(ev.step); s.value.push(ev.value);
      if (s.lower) { s.lower.push(null); s.upper.push(null); }
      const r = st.table.runs.find((x) => x.id === ev.run_id);
      if (r) {
        const m = ((r.metrics ||= {})[ev.name] ||= { last: ev.value, min: ev.value });
        m.last = ev.value; m.min = Math.min(m.min, ev.value);
        const kindCol = kindMetrics("cols").some(([m]) => m === ev.name);
        const key = isEvals() || kindCol ? `metric:${CSS.escape(ev.name)}` : ev.name === "loss" ? "loss" : ev.name === "eval_loss" ? "eval" : "-";
        const cell = tableWrap.querySelector(`tr[data-run="${ev.run_id}"] td[data-cell="${key}"]`);
        // A metric with an interval is shown with it when its interval event follows.
        if (cell && !(isEvals() && (st.table.bounded || []).includes(ev.name))) cell.textContent = fmtNum(ev.value);
      }
      if (isEvals() && !(st.table.metric_names || []).includes(ev.name)) { refresh(); return; }
      if (plotMetrics().includes(ev.name)) renderPlots();
    } else if (ev.type === "interval") {
      // An estimate with its confidence interval (evals, after each shard): the band
      // and the table cell follow.
      const runSeries = (st.series[ev.run_id] ||= {});
      const s = (runSeries[ev.name] ||= { step: [], value: [] });
      let i = s.step.indexOf(ev.step);
      if (i < 0) { s.step.push(ev.step); s.value.push(ev.value); i = s.step.length - 1; }
      s.lower ||= []; s.upper ||= [];
      while (s.lower.length < s.step.length) { s.lower.push(null); s.upper.push(null); }
      s.lower[i] = ev.lower; s.upper[i] = ev.upper;
      const r = st.table.runs.find((x) => x.id === ev.run_id);
      if (r) {
        const m = ((r.metrics ||= {})[ev.name] ||= { last: ev.value, min: ev.value });
        Object.assign(m, { last: ev.value, min: Math.min(m.min ?? ev.value, ev.value), last_step: ev.step, lower: ev.lower, upper: ev.upper });
        if (!(st.table.bounded ||= []).includes(ev.name)) st.table.bounded.push(ev.name);
        const cell = tableWrap.querySelector(`tr[data-run="${ev.run_id}"] td[data-cell="metric:${CSS.escape(ev.name)}"]`);
        if (cell) cell.textContent = fmtInterval(ev.value, ev.lower, ev.upper);
        else refresh();
      }
      if (plotMetrics().includes(ev.name)) renderPlots();
    } else if (ev.type === "progress") {
      const r = st.table.runs.find((x) => x.id === ev.run_id);
      if (!r) { refresh(); return; }
      Object.assign(r, { steps_done: ev.steps_done, total_steps: ev.total_steps, chunks_done: ev.chunks_done });
      const row = tableWrap.querySelector(`tr[data-run="${ev.run_id}"]`);
      if (row) {
        const pct = r.total_steps ? Math.min(100, (100 * r.steps_done) / r.total_steps) : 0;
        const steps = row.querySelector('td[data-cell="steps"]');
        if (steps) steps.replaceChildren(el("span", { class: "bar" }, el("span", { style: `width:${pct}%` })), `${r.steps_done}/${r.total_steps}`);
        const chunks = row.querySelector('td[data-cell="chunks"]');
        if (chunks) chunks.textContent = `${r.chunks_done}/${r.total_chunks || "?"}`;
      }
    } else if (ev.type === "status") {
      log(`run ${ev.run_id}: ${ev.status}${ev.message ? ` (${ev.message})` : ""}`);
      // Shown at once (the server may be gone by the time a refresh asks: furnace run
      // stops serving when its last experiment ends), then refreshed.
      const r = st.table.runs.find((x) => x.id === ev.run_id);
      if (r) {
        r.status = ev.status;
        if (ev.status === "failed" && ev.message) r.error = ev.message;
        renderTable();
      }
      refresh();
    } else if (ev.type === "op") {
      log(`op ${ev.op_id} ${ev.op} run ${ev.run_id}: ${ev.status}${ev.message ? ` (${ev.message})` : ""}`);
      refresh();
    } else if (ev.type === "log") {
      log(ev.message);
    }
  }

  return {
    async show() {
      await loadTable();
      await loadSeries();
      mount(root);
      renderHeader(); renderTable(); renderOps(); renderPlots();
      onEvents(onEvent);
      log(`watching ${name}`);
      requestAnimationFrame(ready);
    },
  };
}

// ---- one run -----------------------------------------------------------------------

async function pageRun(id) {
  const [d, metrics] = await Promise.all([api(`/api/runs/${id}/detail`), api(`/api/runs/${id}/metrics`)]);
  const r = d.run;
  const evals = !!(r.config && r.config.experiment && r.config.experiment.mode === "evals");
  const kv = (rows) => el("table", { class: "kv" }, el("tbody", {}, rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "mono" }, v)))));
  const link = (x) => el("a", { href: `#/r/${x}` }, `run ${x}`);
  const names = [...new Set(metrics.map((m) => m.name))].sort();
  const bySteps = new Map();
  for (const m of metrics) {
    if (!bySteps.has(m.step)) bySteps.set(m.step, {});
    bySteps.get(m.step)[m.name] = m.value;
  }
  const steps = [...bySteps.keys()].sort((a, b) => b - a);
  const metricsTable = el("table", { id: "run-metrics" },
    el("thead", {}, el("tr", {}, el("th", { class: "num" }, evals ? "shard" : "step"), names.map((n) => el("th", { class: "num" }, n)))),
    el("tbody", {}, steps.slice(0, 500).map((s) => el("tr", {}, el("td", { class: "num" }, s), names.map((n) => el("td", { class: "num" }, fmtNum(bySteps.get(s)[n])))))));
  const samples = Array.isArray(d.samples) ? d.samples : [];
  mount(
    el("h1", {}, `Run ${r.id} `, statusBadge(r.status)),
    el("div", { class: "muted" }, "experiment ", el("a", { href: `#/e/${encodeURIComponent(d.experiment)}` }, d.experiment)),
    r.error ? el("div", { class: "panel err" }, r.error) : null,
    el("div", { class: "grid2" },
      el("div", {},
        el("h2", {}, "Progress and lineage"),
        kv([
          ...(evals ? [["shards", `${r.steps_done}/${r.total_steps}`]] : [["steps", `${r.steps_done}/${r.total_steps}`], ["chunks", `${r.chunks_done}/${r.total_chunks}`]]),
          ["checkpoint step", r.checkpoint_step ?? "–"], ["knobs", JSON.stringify(r.knobs)],
          ["parent", d.lineage.length ? el("span", {}, d.lineage.map((x, i) => [i ? " ← " : "", link(x)])) : "–"],
          ["warm start", r.warm ? "yes" : "no"],
          ["children", d.children.length ? el("span", {}, d.children.map((x, i) => [i ? ", " : "", link(x)])) : "–"],
          ["run folder", d.paths.dir], ["checkpoint", d.paths.checkpoint ?? "–"], ["adapter", d.paths.adapter ?? "not yet (written when the run completes)"],
        ]),
        el("h2", {}, "Ops"),
        d.ops.length ? el("ul", {}, d.ops.map((o) => el("li", {}, `op ${o.id} ${o.kind.op} (${o.source}): ${o.status}${o.message ? ` — ${o.message}` : ""}`))) : el("p", { class: "muted" }, "none"),
        samples.length ? el("div", {}, el("h2", {}, "Generations before and after training"),
          samples.map((s) => el("div", { class: "panel" }, el("div", { class: "mono" }, s.prompt), el("div", {}, el("b", {}, "before: "), s.before ?? "–"), el("div", {}, el("b", {}, "after: "), s.after ?? "–")))) : null,
        d.log ? el("div", {}, el("h2", {}, "Log (last lines)"), el("pre", { class: "log" }, d.log.join("\n"))) : null,
      ),
      el("div", {}, el("h2", {}, "Resolved config"), el("pre", { class: "log", id: "run-config" }, JSON.stringify(r.config, null, 2))),
    ),
    el("h2", {}, `Metrics (${metrics.length} values${steps.length > 500 ? ", latest 500 steps shown" : ""})`),
    el("div", { class: "table-wrap" }, metricsTable),
  );
  onEvents(debounce((ev) => { if (ev.run_id === Number(id) && ev.type !== "metric") route(); }, 1000));
  ready();
}

// ---- new experiment ----------------------------------------------------------------

const TEMPLATE = `[experiment]
name = "sweep"
num_chunks = 2
policy = "none"        # or "asha"

[data]
train = "data/extract/train.jsonl"
eval = "data/extract/eval.jsonl"

[model]
base = "smollm2-135m-instruct"

[lora]
r = { list = [8, 16] }
alpha = 16

[trainer]
learning_rate = { list = [1e-4, 3e-4] }
max_steps = 20
`;

function pageNew() {
  const editor = el("textarea", { id: "spec", rows: 24, spellcheck: "false" });
  editor.value = sessionStorage.getItem("furnace-spec") || TEMPLATE;
  const status = el("div", { id: "spec-status" });
  const submitErr = el("div", { class: "err", id: "submit-error" });
  const check = debounce(async () => {
    sessionStorage.setItem("furnace-spec", editor.value);
    try {
      const r = await api("/api/specs/check", { method: "POST", body: { spec: editor.value } });
      status.className = "ok-msg";
      status.textContent = `valid: experiment ${r.name}, ${r.runs} run${r.runs === 1 ? "" : "s"}`;
    } catch (x) {
      status.className = "err";
      status.textContent = x.message;
    }
  }, 350);
  editor.addEventListener("input", check);
  const submit = async (e) => {
    e.preventDefault();
    submitErr.textContent = "";
    try {
      const r = await api("/api/experiments", { method: "POST", body: { spec: editor.value } });
      sessionStorage.removeItem("furnace-spec");
      location.hash = `#/e/${encodeURIComponent(r.experiment)}`;
    } catch (x) { submitErr.textContent = x.message; }
  };
  mount(
    el("h1", {}, "New experiment"),
    el("p", { class: "muted" }, "The spec is checked as you type, exactly as furnace run checks a file. Knobs take ",
      el("code", {}, "{ list = [...] }"), " or ", el("code", {}, "{ range = [lo, hi], ... }"), "; relative data paths are relative to the folder the server runs in."),
    el("form", { id: "new-form", onsubmit: submit }, editor, status,
      el("div", { class: "toolbar" }, el("button", { type: "submit", class: "primary", id: "spec-submit" }, "Start experiment"), submitErr)),
  );
  onEvents(null);
  check();
  ready();
}

// ---- playground --------------------------------------------------------------------

// Streams one chat request: calls onText with each piece; resolves with the `done` event.
async function streamChat(body, onText) {
  const r = await fetch("/api/playground/chat", { method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (!r.ok) {
    let msg = r.statusText;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    if (r.status === 401) showLogin();
    throw new ApiError(r.status, msg);
  }
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "", done = null;
  for (;;) {
    const { value, done: end } = await reader.read();
    if (end) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const ev = JSON.parse(data);
      if (name === "text") onText(ev.text);
      else if (name === "done") { if (ev.text) onText(ev.text); done = ev; }
      else if (name === "error") throw new ApiError(500, ev.error);
    }
  }
  return done;
}

async function pagePlay() {
  const t = await api("/api/playground/targets");
  const options = [el("option", { value: "" }, "— choose —")]
    .concat(t.bases.map((b) => el("option", { value: JSON.stringify({ model: b.model }) }, `base: ${b.model}${b.quantize !== "none" ? ` (${b.quantize})` : ""}`)))
    .concat(t.runs.map((r) => el("option", { value: JSON.stringify({ run: r.run }) }, `run ${r.run} (${r.experiment}) ${Object.entries(r.knobs || {}).map(([k, v]) => `${k}=${knobText(v)}`).join(" ")}`)));
  const panes = [0, 1].map((i) => {
    const select = el("select", { id: `target-${i}` }, options.map((o) => o.cloneNode(true)));
    if (i === 0 && t.bases.length) select.selectedIndex = 1;
    if (i === 1 && t.runs.length) select.selectedIndex = 1 + t.bases.length;
    const transcript = el("div", { class: "log", id: `transcript-${i}`, style: "min-height:260px" });
    const history = [];
    return { select, transcript, history, root: el("div", { class: "panel" }, select, " ", el("button", { type: "button", onclick: () => { history.length = 0; transcript.replaceChildren(); } }, "Clear"), transcript) };
  });
  const prompt = el("textarea", { id: "play-prompt", rows: 3, placeholder: "a message for both (Enter sends, Shift+Enter for a new line)" });
  const maxTokens = el("input", { type: "number", id: "play-max", min: 1, max: 2048, value: 128, style: "width:90px" });
  const temp = el("input", { type: "number", id: "play-temp", min: 0, max: 5, step: 0.1, value: 0, style: "width:70px" });
  const send = async () => {
    const text = prompt.value.trim();
    if (!text) return;
    prompt.value = "";
    await Promise.all(panes.map(async (p) => {
      if (!p.select.value) return;
      const target = JSON.parse(p.select.value);
      p.history.push({ role: "user", content: text });
      p.transcript.append(el("div", {}, el("b", {}, "you: "), text));
      const out = el("span", { class: "reply" });
      p.transcript.append(el("div", {}, el("b", {}, "model: "), out));
      let reply = "";
      try {
        const done = await streamChat({ ...target, messages: p.history, max_tokens: Number(maxTokens.value), temperature: Number(temp.value) }, (piece) => { reply += piece; out.textContent = reply; });
        p.history.push({ role: "assistant", content: reply });
        p.transcript.append(el("div", { class: "muted", dataset: { done: "1" } }, `${done ? done.tokens : "?"} tokens, ${done ? done.finish_reason : "?"}`));
      } catch (x) {
        p.history.pop();
        p.transcript.append(el("div", { class: "err", dataset: { done: "1" } }, x.message));
      }
      p.transcript.scrollTop = p.transcript.scrollHeight;
    }));
  };
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
  mount(
    el("h1", {}, "Playground"),
    el("p", { class: "muted" }, "Chat with a base model or a completed run's adapter; two side by side get the same messages. The first message to a base loads it (a few seconds)."),
    el("div", { class: "grid2" }, panes.map((p) => p.root)),
    el("div", { class: "toolbar" }, prompt),
    el("div", { class: "toolbar" }, "max tokens ", maxTokens, " temperature ", temp, el("button", { type: "button", class: "primary", id: "play-send", onclick: send }, "Send")),
  );
  onEvents(null);
  ready();
}

// ---- routing -----------------------------------------------------------------------

function ready() {
  document.body.dataset.ready = String(Date.now());
  if (!window.furnaceFirstPaint) window.furnaceFirstPaint = performance.now();
}

async function route() {
  delete document.body.dataset.ready;
  const h = location.hash || "#/";
  const parts = h.slice(2).split("/").map(decodeURIComponent);
  try {
    if (parts[0] === "e" && parts[1]) await experimentPage(parts[1]).show();
    else if (parts[0] === "r" && parts[1]) await pageRun(parts[1]);
    else if (parts[0] === "adapters") await pageAdapters();
    else if (parts[0] === "new") pageNew();
    else if (parts[0] === "play") await pagePlay();
    else await pageExperiments();
  } catch (x) {
    if (x.status === 401) return;
    mount(el("h1", {}, "Something went wrong"), el("div", { class: "panel err", id: "page-error" }, x.message));
    ready();
  }
}

function initTheme() {
  const saved = localStorage.getItem("furnace-theme");
  const dark = saved ? saved === "dark" : window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("#theme").addEventListener("click", () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("furnace-theme", next);
    route();
  });
}

$("#logout").addEventListener("click", async () => {
  try { await api("/api/logout", { method: "POST", body: {} }); } catch (_) { /* gone already */ }
  $("#logout").hidden = true;
  showLogin();
});

window.addEventListener("hashchange", route);
initTheme();
connectEvents();
route();
