"""`thresher batches RUN_DIR`: the Batch API jobs of a run (status, counts, cost), and `--cancel`."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("batches")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--cancel", is_flag=True, help="Cancel every job not finished yet (a re-run collects what they answered).")
@click.option("--offline", is_flag=True, help="Show what the run's ledgers say; ask no server.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def batches(run_dir: Path, cancel: bool, offline: bool, as_json: bool) -> None:
    """List a run's Batch API jobs with status, request counts and cost."""
    from thresher.llms.batch import run_jobs

    rows = run_jobs(run_dir, refresh=not offline, cancel=cancel)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"{run_dir}: no batch jobs (no step ran with `batch:` on its backend)")
        return
    head = ("step", "job", "mode", "status", "requests", "completed", "failed", "cost USD")
    table = [head] + [
        (r["step"], r["job"], r["mode"], r["status"] + (f" ({r['note']})" if r["note"] else ""), str(r["requests"]),
         "-" if r["completed"] is None else str(r["completed"]), "-" if r["failed"] is None else str(r["failed"]),
         "-" if r["cost_usd"] is None else f"{r['cost_usd']:.6f}")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    total = sum(r["cost_usd"] or 0.0 for r in rows)
    click.echo(f"{len(rows)} job(s); collected ones cost ${total:.6f} at batch prices")
