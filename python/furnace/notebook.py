"""Live progress of ``run_fit`` / ``run_evals``: in Jupyter a table of runs and metrics
updated in place (with Stop / Resume / Clone / Delete buttons when the experiment serves
its dashboard), elsewhere one line per status change on stderr."""

from __future__ import annotations

import html
import json
import sys
import time
from typing import Any, Dict, List, Optional

from . import _native


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a live table can be shown)."""
    try:
        from IPython import get_ipython  # type: ignore
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def runs_table(exp: Any) -> List[Dict[str, Any]]:
    """The rows of the live table: each run's status, progress, knobs and its latest
    value of every metric (evals: with the interval)."""
    runs = json.loads(_native.runs(exp.path, exp.name))
    res = json.loads(_native.results(exp.path, exp.name))
    latest: Dict[int, Dict[str, Any]] = {}
    for m in res["metrics"]:
        cur = latest.setdefault(m["run_id"], {})
        if m["name"] not in cur or cur[m["name"]][0] <= m["step"]:
            cur[m["name"]] = (m["step"], m["value"])
    bounds: Dict[tuple, tuple] = {}
    for b in res["bounds"]:
        key = (b["run_id"], b["name"])
        if key not in bounds or bounds[key][0] <= b["step"]:
            bounds[key] = (b["step"], b["lower"], b["upper"])
    rows = []
    for r in runs:
        if r["status"] == "deleted":
            continue
        metrics = {}
        for name, (step, value) in sorted(latest.get(r["id"], {}).items()):
            if name in ("lr", "tokens", "grad_norm"):
                continue
            b = bounds.get((r["id"], name))
            metrics[name] = f"{value:.4g}" + (f" [{b[1]:.3g}, {b[2]:.3g}]" if b and b[0] == step else "")
        rows.append(
            {
                "run": r["id"],
                "status": r["status"],
                "progress": f"{r['chunks_done']}/{r['total_chunks']} chunks, {r['steps_done']}/{r['total_steps']} steps",
                "knobs": ", ".join(f"{k}={v}" for k, v in (r["knobs"] or {}).items()),
                "metrics": metrics,
                "error": (r["error"] or "").strip().splitlines()[-1:] if r["error"] else [],
            }
        )
    return rows


def render_html(exp: Any, rows: List[Dict[str, Any]]) -> str:
    """The live table as HTML (buttons post IC ops to the experiment's dashboard)."""
    names = sorted({n for r in rows for n in r["metrics"]})
    url = getattr(exp, "dashboard_url", None)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["run", "status", "progress", "knobs"] + names + (["ops"] if url else []))
    body = []
    for r in rows:
        cells = [str(r["run"]), r["status"] + (f" ({html.escape(r['error'][0])})" if r["error"] else ""), r["progress"], html.escape(r["knobs"])]
        cells = [c if i == 1 else html.escape(c) if i != 3 else c for i, c in enumerate(cells)]
        cells += [html.escape(r["metrics"].get(n, "")) for n in names]
        if url:
            cells.append(_buttons(url, r["run"], r["status"]))
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    title = html.escape(f"{exp.name} ({exp.mode})")
    link = f' &middot; <a href="{html.escape(url)}/" target="_blank">dashboard</a>' if url else ""
    return (
        f'<div class="furnace-live"><b>{title}</b>{link}'
        f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _buttons(url: str, run: int, status: str) -> str:
    def button(label: str, op: str, extra: str = "") -> str:
        body = "{run:%d,op:'%s'%s}" % (run, op, extra)
        js = f"fetch('{url}/api/ops',{{method:'POST',headers:{{'Content-Type':'application/json'}},body:JSON.stringify({body})}})"
        return f'<button onclick="{html.escape(js)}">{label}</button>'

    clone_js = (
        "(function(){var s=prompt('Clone run %d with changes (section.key=value, comma separated):','lora.r=32');"
        "if(s===null)return;fetch('%s/api/ops',{method:'POST',headers:{'Content-Type':'application/json'},"
        "body:JSON.stringify({run:%d,op:'clone',warm:true,set:s.split(',').map(function(x){return x.trim()}).filter(Boolean)})})})()"
        % (run, url, run)
    )
    out = []
    if status in ("ongoing", "new"):
        out.append(button("Stop", "stop"))
    if status == "stopped":
        out.append(button("Resume", "resume"))
    out.append(f'<button onclick="{html.escape(clone_js)}">Clone</button>')
    out.append(button("Delete", "delete"))
    return " ".join(out)


class Progress:
    """What ``run_fit``/``run_evals`` show while they run."""

    def __init__(self, exp: Any, display: Optional[bool]):
        self.exp = exp
        self.notebook = in_notebook() if display is None else bool(display) and in_notebook()
        self.quiet = display is False
        self.handle = None
        self.last = 0.0

    def start(self) -> None:
        if self.notebook:
            from IPython.display import HTML, display  # type: ignore

            self.handle = display(HTML(render_html(self.exp, runs_table(self.exp))), display_id=True)

    def on_events(self, events: List[str]) -> None:
        if self.quiet:
            return
        for text in events:
            ev = json.loads(text)
            kind = ev.get("type")
            if kind == "log":
                print(f"[{ev['experiment']}] {ev['message']}", file=sys.stderr)
            elif kind == "status" and ev["status"] != "failed":  # a failure is logged with its reason
                why = f": {ev['message'].strip().splitlines()[-1]}" if ev.get("message") else ""
                print(f"[{ev['experiment']}] run {ev['run_id']} {ev['status']}{why}", file=sys.stderr)
        if self.handle is not None and time.monotonic() - self.last > 0.5:
            self.refresh()

    def refresh(self) -> None:
        from IPython.display import HTML  # type: ignore

        self.last = time.monotonic()
        self.handle.update(HTML(render_html(self.exp, runs_table(self.exp))))

    def finish(self) -> None:
        if self.handle is not None:
            self.refresh()
