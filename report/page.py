"""`write_report(run_dir)`: one self-contained HTML file about a run (figures, tables, a row browser; no network).

The page is assembled from the sections `thresher.report.collect` finds in the run; a section whose data the run
does not hold is left out. Figures are matplotlib SVGs embedded as data URIs (each one keeps its own ids, so
several on one page cannot clash); the row browser is a JSON block and a few lines of plain JavaScript.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from thresher.pipelines.runner import atomic_write_text, open_run
from thresher.report import collect as C

log = logging.getLogger("thresher.report")
REPORT_FILE = "report.html"


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _num(x: Any, digits: int = 0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}" if digits else f"{x:,.0f}" if x.is_integer() else f"{x:,.3g}"
    if isinstance(x, int):
        return f"{x:,}"
    return _e(x)


def _img(svg: str, alt: str) -> str:
    data = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img class="plot" alt="{_e(alt)}" src="data:image/svg+xml;base64,{data}">'


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "–"
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stage(x: dict[str, Any]) -> str:
    return "seed" if not x["round"] else f"round {x['round']} · {_e(x['operation'])}"


class _Page:
    def __init__(self) -> None:
        self.sections: list[tuple[str, str, str]] = []  # id, title, body

    def add(self, sid: str, title: str, body: str) -> None:
        self.sections.append((sid, title, body))

    def guarded(self, sid: str, title: str, build: Callable[[], str | None]) -> None:
        """A section that fails to build is replaced by a note naming the error: one odd step must not cost the
        whole report."""
        try:
            body = build()
        except Exception as e:
            log.warning("report section %r failed: %s: %s", title, type(e).__name__, e, exc_info=True)
            body = f'<p class="warn">This section could not be built: {_e(type(e).__name__)}: {_e(e)}</p>'
        if body:
            self.add(sid, title, body)


def build_report(run_dir: str | os.PathLike[str]) -> str:
    """The report of the run in `run_dir` as HTML text."""
    from thresher.report import plots

    run = open_run(run_dir)
    man = run.manifest
    steps = C.collect_steps(run)
    page = _Page()

    # ---- overview -------------------------------------------------------------------------------
    total_s = sum(s.seconds or 0.0 for s in steps if s.status != "cached")
    cost = sum(float(s.metrics.get("cost_usd") or 0.0) for s in steps)
    requests = sum(int(s.metrics.get("requests") or 0) for s in steps)
    leaves = [s for s in steps if not any(s.name in t.parents for t in steps)]
    cards = [
        ("steps", f"{len(steps)}", ", ".join(f"{sum(s.status == k for s in steps)} {k}" for k in
                                             ("done", "cached", "failed", "pending", "running") if any(s.status == k for s in steps))),
        ("final rows", " / ".join(_num(s.rows_out) for s in leaves), ", ".join(_e(s.name) for s in leaves)),
        ("wall time", f"{total_s:,.1f} s", "steps run in this run"),
        ("LLM requests", _num(requests), f"${cost:,.4f} spent" if cost else "no cost recorded"),
    ]
    overview = '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{k}</div><div class="v">{v}</div><div class="s">{s}</div></div>'
        for k, v, s in cards) + "</div>"  # fmt: skip
    failed = [s for s in steps if s.error]
    if failed:
        overview += "".join(f'<p class="warn"><b>{_e(s.name)}</b> failed: {_e(s.error)}</p>' for s in failed)
    page.add("overview", "Overview", overview)

    # ---- DAG and accounting -----------------------------------------------------------------------
    def dag() -> str:
        rows = []
        for s in steps:
            cand = f" ({_num(s.candidates)} candidates)" if s.candidates is not None else ""
            rows.append([f"<b>{_e(s.name)}</b>", _e(s.cls), f'<span class="st {_e(s.status)}">{_e(s.status)}</span>',
                         ", ".join(_e(p) for p in s.parents) or "–", _num(s.rows_in) + cand, _num(s.rows_out),
                         _num(s.rows_rejected), _num(s.rows_failed),
                         f"{s.seconds:.2f}" if s.seconds is not None else "–"])  # fmt: skip
        table = _table(["step", "class", "status", "after", "in", "out", "rejected", "failed", "seconds"], rows, "num")
        details = "".join(
            f"<details><summary>{_e(s.name)}: parameters and metrics</summary><pre>"
            f"{_e(json.dumps({'params': s.params, 'metrics': s.metrics}, indent=2, ensure_ascii=False, default=str))}"
            "</pre></details>" for s in steps)  # fmt: skip
        return (f'<div class="grid2"><div>{_img(plots.dag(steps), "pipeline DAG")}</div>'
                f'<div>{_img(plots.accounting(steps), "rows per step")}</div></div>{table}{details}')

    page.guarded("dag", "Pipeline and row accounting", dag)

    def reasons() -> str | None:
        blocks = []
        for s in steps:
            groups = C.collect_reasons(s)
            if not groups:
                continue
            rows = []
            for g in groups:
                ex = "".join(f'<div class="ex"><code>{_e(x["id"])}</code> {_e(x["instruction"])}'
                             f'<div class="why">{_e(x["reason"])}</div></div>' for x in g.examples)
                rows.append([_num(g.count), f"{100 * g.count / max(s.rows_rejected or 1, 1):.0f}%", _e(g.pattern), ex])
            blocks.append(f"<h3>{_e(s.name)} <small>{_e(s.cls)} · {_num(s.rows_rejected)} rejected</small></h3>"
                          + _table(["rows", "share", "reason", "examples"], rows, "reasons"))
        return "".join(blocks) or None

    page.guarded("reasons", "Top rejection reasons", reasons)

    # ---- scores -------------------------------------------------------------------------------------
    score_cols = C.score_columns(steps)

    def scores() -> str | None:
        hists = C.collect_scores(steps)
        if not hists:
            return None
        return '<div class="grid3">' + "".join(_img(plots.histogram(h), f"histogram of {h.column}") for h in hists) + "</div>"

    page.guarded("scores", "Score distributions", scores)

    def compare() -> str | None:
        comps = C.collect_comparisons(steps)
        if not comps:
            return None
        out = []
        for c in comps:
            head = ["score", f"pool ({_e(c.pool)})", *(_e(n) for n in c.selections), *(f"{_e(n)} (random)" for n in c.random)]
            rows = []
            for col, per in c.scores.items():
                rows.append([_e(col), *(f"{per[k].mean():.3f}" if len(per[k]) else "–" for k in per)])
            out.append(f"<p>Mean of each score: the selections from <b>{_e(c.pool)}</b> beside a random draw of the "
                       "same pool. A selection that does not beat random on the score it ranks by is worth a second look.</p>"
                       + _table(head, rows, "num") + _img(plots.comparison(c), f"selection vs random from {c.pool}"))
        return "".join(out)

    page.guarded("selection", "Selection against the random baseline", compare)

    def embeddings() -> str | None:
        maps = C.collect_embeddings(steps)
        if not maps:
            return None
        out = []
        for m in maps:
            note = f" (a sample of {len(m.xy):,} of {m.total:,} rows)" if len(m.xy) < m.total else ""
            out.append(f"<p>The vectors {_e(m.step)} stored, projected on their first two principal components{note}.</p>"
                       + _img(plots.embedding(m), f"embedding map of {m.step}"))
        return "".join(out)

    page.guarded("embeddings", "Embedding map", embeddings)

    def lineage() -> str | None:
        lins = C.collect_lineage(steps)
        if not lins:
            return None
        out = []
        for lin in lins:
            chains = []
            for chain in lin.chains:
                items = "".join(
                    f'<li><span class="tag">{_stage(x)}</span> <code>{_e(x["id"])}</code><div>{_e(x["instruction"])}</div></li>'
                    for x in chain)  # fmt: skip
                chains.append(f'<ol class="chain">{items}</ol>')
            out.append(f'<div class="grid2"><div>{_img(plots.lineage(lin), f"evolutions of {lin.step}")}</div>'
                       f'<div><h3>{_e(lin.step)}: a few lineages, seed first</h3>{"".join(chains)}</div></div>')
        return "".join(out)

    page.guarded("lineage", "Lineage of evolved examples", lineage)

    # ---- rows -----------------------------------------------------------------------------------------
    def browser() -> str | None:
        rows = C.collect_rows(steps, score_cols)
        if not rows:
            return None
        data = json.dumps(rows, ensure_ascii=False).replace("</", "<\\/")
        options = "".join(f'<option value="{_e(s.name)}">{_e(s.name)}</option>' for s in steps)
        return (
            '<div class="controls"><input id="rb-search" type="search" placeholder="Search ids, text, scores, reasons…">'
            f'<select id="rb-step"><option value="">all steps</option>{options}</select>'
            '<select id="rb-status"><option value="">kept, rejected and failed</option><option>kept</option>'
            '<option>rejected</option><option>failed</option></select><span id="rb-count"></span></div>'
            '<table id="rb-table" class="rows"><thead><tr><th>step</th><th>status</th><th>id</th><th>instruction</th>'
            '<th>output</th><th>scores</th><th>reason</th></tr></thead><tbody></tbody></table>'
            f'<script id="rb-data" type="application/json">{data}</script>'
        )

    page.guarded("rows", "Row browser", browser)

    # ---- usage and timings --------------------------------------------------------------------------
    def usage() -> str | None:
        rows = C.usage_rows(steps)
        if not rows:
            return None
        head = ["step", "requests", "prompt tokens", "completion tokens", "cache hits", "cache misses", "retries",
                "re-asks", "errors", "cost (USD)", "seconds"]  # fmt: skip
        body = [[_e(r["step"]), *(_num(r[k]) for k in C.USAGE_KEYS[:-1]), f"{float(r['cost_usd']):.4f}",
                 f"{r['seconds']:.2f}" if r["seconds"] is not None else "–"] for r in rows]  # fmt: skip
        plot = _img(plots.tokens(rows), "tokens per step") if any(r["prompt_tokens"] or r["completion_tokens"] for r in rows) else ""
        return _table(head, body, "num") + plot

    page.guarded("usage", "Model usage and cost", usage)
    page.guarded("timings", "Timings", lambda: _img(plots.timings(steps), "seconds per step") if steps else None)

    def training() -> str | None:
        logs = C.collect_training(run.run_dir)
        if not logs:
            return None
        out = []
        for t in logs:
            speed = [r["tokens_per_s"] for r in t.train if isinstance(r.get("tokens_per_s"), (int, float))]
            mfu = [r["mfu"] for r in t.train if isinstance(r.get("mfu"), (int, float))]
            facts = [f"{len(t.train)} logged steps"]
            if t.train:
                facts.append(f"final train loss {t.train[-1]['loss']:.4f}")
            if t.eval:
                facts.append(f"final eval loss {t.eval[-1]['eval_loss']:.4f}")
            if speed:
                facts.append(f"mean {sum(speed) / len(speed):,.0f} tokens/s")
            if mfu:
                facts.append(f"mean MFU {100 * sum(mfu) / len(mfu):.2f}%")
            out.append(f"<p><code>{_e(t.path)}</code>: {'; '.join(facts)}.</p>" + _img(plots.training(t), "training curves"))
        return "".join(out)

    page.guarded("training", "Training", training)

    def evaluation() -> str | None:
        ev = C.collect_evaluation(Path(run.run_dir))
        if ev is None:
            return None
        out = []
        res = ev.results or {}
        if res.get("heldout_loss"):
            rows = [[_e(k), f"{v:.4f}"] for k, v in res["heldout_loss"].items() if isinstance(v, (int, float))]
            out.append("<p>Held-out loss (mean over answer tokens; lower is better).</p>" + _table(["model", "loss"], rows, "num"))
        if "pgr" in res:
            pgr = res["pgr"]
            out.append(f"<p>Performance gap recovered: <b>{_e(f'{pgr:.3f}' if isinstance(pgr, (int, float)) else 'n/a')}"
                       "</b> = (loss<sub>weak</sub> − loss<sub>student</sub>) / (loss<sub>weak</sub> − loss<sub>ceiling</sub>).</p>")
        for path, d in ev.pairwise:
            rows = [[_e(s.get("name")), _num(s.get("n")), _num(s.get("wins")), _num(s.get("ties")), _num(s.get("losses")),
                     _num(s.get("failed")), f"{s['winning_score']:.3f}" if s.get("winning_score") is not None else "–"]
                    for s in d.get("sets", [])]  # fmt: skip
            out.append(f"<p><code>{_e(path)}</code>: {_e(d.get('model_a'))} against {_e(d.get('model_b'))}, judged in "
                       "both orders; winning score = (wins − losses) / n + 1.</p>"
                       + _table(["set", "n", "win", "tie", "loss", "failed", "winning score"], rows, "num"))
        if ev.rounds:
            rows = [[_num(r.get("round")), _num(r.get("rows")), _e(r.get("comparison")), _e("yes" if r.get("improved") else "no")]
                    for r in ev.rounds.get("rounds", [])]  # fmt: skip
            out.append(f"<p>Iterative loop: best round {_e(ev.rounds.get('best_round'))}; "
                       f"{_e(ev.rounds.get('stopped'))}.</p>" + _table(["round", "rows", "comparison", "improved"], rows))
        return "".join(out) or None

    page.guarded("evaluation", "Evaluation", evaluation)

    nav = "".join(f'<a href="#{sid}">{_e(_NAV.get(sid, title))}</a>' for sid, title, _ in page.sections)
    body = "".join(f'<section id="{sid}"><h2>{_e(title)}</h2>{content}</section>' for sid, title, content in page.sections)
    versions = man.get("versions") or {}
    meta = (f"started {_when(man.get('started_at'))} · updated {_when(man.get('updated_at'))} · "
            + " · ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items() if v))
    title = f"thresher run report: {man.get('pipeline') or Path(run.run_dir).name}"
    return _TEMPLATE.format(title=_e(title), run_dir=_e(run.run_dir), meta=meta, nav=nav, body=body, css=_CSS, js=_JS)


def write_report(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report of the run in `run_dir` to `out` (default `run_dir/report.html`); returns its path."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("the run report draws its figures with matplotlib: pip install matplotlib") from e
    from thresher.pipelines.run_store import RemoteRunDir, is_remote

    store = RemoteRunDir(os.fspath(run_dir)) if is_remote(run_dir) else None
    if store is not None:  # a run on an object store: read from its local copy; the report goes to the store too
        store.pull()
    local = store.local if store is not None else Path(run_dir)
    text = build_report(local)
    path = Path(out) if out is not None else local / REPORT_FILE
    atomic_write_text(path, text, fsync=False)
    if store is not None and out is None:
        store.push([path])
    return path


#: the navigation bar's short names of the sections (one line on a laptop screen)
_NAV = {"dag": "Pipeline", "reasons": "Rejections", "scores": "Scores", "selection": "Selection vs random",
        "embeddings": "Embeddings", "lineage": "Lineage", "rows": "Rows", "usage": "Usage and cost"}  # fmt: skip

_CSS = """
:root{--ink:#1f2933;--mute:#66727f;--line:#e3e7ec;--bg:#f6f7f9;--accent:#3b6fd4}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header{background:#1f2a3a;color:#fff;padding:18px 28px 12px}header h1{margin:0;font-size:20px;font-weight:600}
header .meta{color:#b8c3d1;font-size:12px;margin-top:4px}nav{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:8px 28px;display:flex;flex-wrap:wrap;gap:4px 18px}
nav a{color:var(--accent);text-decoration:none;font-size:13px}nav a:hover{text-decoration:underline}
main{max-width:1320px;margin:0 auto;padding:8px 28px 40px}section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:14px 20px 18px;margin:18px 0}
h2{font-size:17px;margin:2px 0 12px}h3{font-size:14px;margin:16px 0 6px}h3 small{color:var(--mute);font-weight:400}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:12px}.card{border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:#fbfcfd}
.card .k{color:var(--mute);font-size:12px;text-transform:uppercase;letter-spacing:.04em}.card .v{font-size:22px;font-weight:600;margin:2px 0}.card .s{color:var(--mute);font-size:12px}
img.plot{max-width:100%;height:auto;display:block;margin:8px auto}.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px;align-items:start}
.grid3{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:12px}
table{border-collapse:collapse;width:100%;margin:10px 0;font-size:13px}th,td{border-bottom:1px solid var(--line);padding:5px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f8;font-weight:600;position:sticky;top:37px}table.num td{font-variant-numeric:tabular-nums}
.st{padding:1px 8px;border-radius:10px;font-size:12px}.st.done{background:#dff3e8}.st.cached{background:#e3ecfb}.st.failed{background:#fbe0e0}.st.pending,.st.running{background:#eef0f2}
.reasons .ex{margin:2px 0 6px;font-size:12px}.why{color:var(--mute)}code{font-size:12px;background:#f1f3f6;padding:0 4px;border-radius:4px}
details{margin:4px 0}summary{cursor:pointer;color:var(--mute);font-size:13px}pre{background:#f6f8fa;padding:10px;border-radius:6px;overflow:auto;max-height:320px;font-size:12px}
ol.chain{list-style:none;padding:0;margin:8px 0 14px;border-left:3px solid #c9d6ef}ol.chain li{padding:4px 10px}ol.chain li div{font-size:13px}
.tag{display:inline-block;background:#eef2fb;color:#2d4f9a;border-radius:9px;padding:0 8px;font-size:11px}
.controls{display:flex;gap:10px;align-items:center;flex-wrap:wrap}#rb-search{flex:1;min-width:260px;padding:7px 10px;border:1px solid #cfd6de;border-radius:6px;font-size:14px}
select{padding:6px;border:1px solid #cfd6de;border-radius:6px}#rb-count{color:var(--mute);font-size:13px}
table.rows td{font-size:12.5px;max-width:360px;white-space:pre-wrap;word-break:break-word}table.rows td.sc{white-space:nowrap;font-variant-numeric:tabular-nums}table.rows td>div{display:-webkit-box;-webkit-line-clamp:4;-webkit-box-orient:vertical;overflow:hidden}
table.rows tr.open td>div{display:block;-webkit-line-clamp:unset}table.rows tbody tr{cursor:pointer}table.rows tbody tr:hover{background:#f8fafc}
table.rows td:nth-child(-n+2){white-space:nowrap}table.rows td:nth-child(3){font-family:ui-monospace,monospace;font-size:11.5px;min-width:140px;max-width:170px;word-break:break-all}
table.rows td:nth-child(4){width:24%}table.rows td:nth-child(5){width:28%}table.rows td:nth-child(7){width:18%;color:#7a4a16}
tr.kept td:nth-child(2){color:#207a50}tr.rejected td:nth-child(2){color:#b8651f}tr.failed td:nth-child(2){color:#b33}
.warn{background:#fff4e5;border-left:4px solid #e8833a;padding:6px 10px}
"""

_JS = """
(function(){
  var el=document.getElementById('rb-data'); if(!el) return; var LIMIT=60;
  var rows=JSON.parse(el.textContent), body=document.querySelector('#rb-table tbody');
  var q=document.getElementById('rb-search'), st=document.getElementById('rb-step'), ss=document.getElementById('rb-status'), cnt=document.getElementById('rb-count');
  rows.forEach(function(r){r._text=[r.step,r.status,r.id,r.instruction,r.output,r.reason,JSON.stringify(r.scores)].join(' ').toLowerCase();});
  function cell(tr,text,cls){var td=document.createElement('td'),d=document.createElement('div');d.textContent=text;td.appendChild(d);if(cls)td.className=cls;tr.appendChild(td);}
  function render(){
    var words=q.value.toLowerCase().split(/\\s+/).filter(Boolean), step=st.value, status=ss.value, shown=0;
    var frag=document.createDocumentFragment();
    rows.forEach(function(r){
      if(step&&r.step!==step) return; if(status&&r.status!==status) return;
      for(var i=0;i<words.length;i++){ if(r._text.indexOf(words[i])<0) return; }
      shown++; if(shown>LIMIT) return; var tr=document.createElement('tr'); tr.className=r.status; tr.title='click to show the whole row';
      tr.addEventListener('click',function(){tr.classList.toggle('open');});
      cell(tr,r.step);cell(tr,r.status);cell(tr,r.id);cell(tr,r.instruction);cell(tr,r.output);
      cell(tr,Object.keys(r.scores).map(function(k){return k+' '+r.scores[k];}).join('\\n'),'sc');cell(tr,r.reason);
      frag.appendChild(tr);
    });
    body.replaceChildren(frag); cnt.textContent=(shown>LIMIT?'first '+LIMIT+' of ':'')+shown+' matching, of '+rows.length+' sampled rows';
  }
  q.addEventListener('input',render); st.addEventListener('change',render); ss.addEventListener('change',render); render();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body><header><h1>{title}</h1><div class="meta">{run_dir} · {meta}</div></header>
<nav>{nav}</nav><main>{body}</main>
<script>{js}</script></body></html>
"""
