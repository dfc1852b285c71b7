"""The `thresher` command: run recipes, convert datasets, inspect files and run directories, train."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import click

from thresher.errors import ThresherError

# Commands that live with the code they drive and import heavy libraries: loaded only when called.
_LAZY_COMMANDS = {
    "train": ("thresher.trainer.cli", "train", "Fine-tune a model with LoRA SFT from a YAML config."),
    "export": ("thresher.trainer.cli", "export", "Export a dataset for TRL, LLaMA-Factory or axolotl."),
    "batches": ("thresher.llms.batch_cli", "batches", "List a run's Batch API jobs (status, counts, cost); --cancel."),
    "serve": ("thresher.llms.serve", "serve_command", "Serve the embedded model over an OpenAI-compatible API."),
    "eval": ("thresher.evaluation.cli", "eval_command", "Compare two models pairwise with a judge (AlpaGasus/Cherry)."),
    "learn": ("thresher.evaluation.cli", "learn_command", "Build a set, train on it, evaluate: a training recipe."),
    "iterate": ("thresher.evaluation.cli", "iterate_command", "The data <-> training loop, round after round."),
}


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *_LAZY_COMMANDS])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in _LAZY_COMMANDS:
            module, attr, _ = _LAZY_COMMANDS[name]
            try:
                cmd: click.Command = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise click.ClickException(f"`thresher {name}` is not available: {e}") from e
            return cmd
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in _LAZY_COMMANDS:
                rows.append((name, _LAZY_COMMANDS[name][2]))
            else:
                cmd = super().get_command(ctx, name)
                if cmd is not None:
                    rows.append((name, cmd.get_short_help_str(80)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ThresherError as e:  # expected failures: one clear message, no traceback
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="thresher")
def main() -> None:
    """thresher: grow, judge, dedup, polish and train on instruction data, as resumable pipelines."""


@main.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", default=None,
              help="Run directory (default: runs/<recipe name>), a local folder or an object store (s3://bucket/prefix: "
                   "any pyarrow filesystem). Finished steps found there are not run again.")
@click.option("--fresh", is_flag=True, help="Ignore and delete cached outputs of this recipe's steps first.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or step messages.")
@click.option("--export", "export", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the final step's output to this file (format from its extension).")
@click.option("--layout", default="alpaca", show_default=True,
              help="Layout of --export: alpaca, sharegpt, messages or prompt_completion.")
@click.option("--no-cache", is_flag=True,
              help="Do not read or write the LLM request cache (every model request is sent again).")
@click.option("--estimate", is_flag=True,
              help="Send nothing: print the expected requests, tokens and cost per step (finished steps cost 0).")
@click.option("--estimate-sample", default=8, show_default=True, help="Rows the --estimate prompts are rendered on.")
@click.option("--estimate-fill", default=0.5, show_default=True,
              help="--estimate: expected completion length as a fraction of max_tokens.")
@click.option("--no-report", is_flag=True, help="Do not write report.html (the HTML run report) in the run directory.")
@click.option("--runner", type=click.Choice(["local", "ray"]), default=None,
              help="Where row steps run: this process, or a Ray cluster (default: the recipe's `runner:`, else local).")
@click.option("--address", default=None,
              help="--runner ray: the cluster to join (default: $RAY_ADDRESS, else a local cluster sized to this machine).")
def run(
    recipe: Path, out: str | None, fresh: bool, quiet: bool, export: Path | None, layout: str, no_cache: bool,
    estimate: bool = False, estimate_sample: int = 8, estimate_fill: float = 0.5, no_report: bool = False,
    runner: str | None = None, address: str | None = None,
) -> None:
    """Run the pipeline in RECIPE (YAML), resuming whatever an earlier run finished."""
    import os

    from thresher.errors import BudgetExceeded
    from thresher.pipelines.recipe import load_recipe

    if no_cache:
        os.environ["THRESHER_NO_CACHE"] = "1"  # read by every backend when it opens its request cache

    pipeline = load_recipe(recipe)
    run_dir = out or str(Path("runs") / pipeline.name)
    if estimate:
        click.echo(pipeline.estimate(None if fresh else run_dir, sample=estimate_sample, fill=estimate_fill).table())
        return
    try:
        if address is not None and (runner or pipeline.runner) != "ray":
            raise click.UsageError("--address names a Ray cluster: use it with --runner ray (or `runner: ray`)")
        result = pipeline.run(run_dir, fresh=fresh, progress=not quiet, runner=runner, address=address)
    except BudgetExceeded as e:
        click.echo(_steps_table(_working_copy(run_dir)), err=True)
        raise click.ClickException(f"stopped: {e}") from None
    finally:  # a stopped or failed run gets its report too: it shows what each step did and which one failed
        if not no_report:
            _write_run_report(run_dir, quiet)
    click.echo(_steps_table(result.run_dir))
    for leaf in pipeline.leaves():
        click.echo(f"output of {leaf}: {result.output_dir(leaf)}")
    if export is not None:
        from thresher.data import write_records

        final = list(pipeline.nodes)[-1]
        n = write_records(result.table(final), export, layout=layout)
        click.echo(f"exported {n} rows of {final} to {export} ({layout})")


@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option("--to", "to_layout", required=True,
              help="Layout to write: alpaca, sharegpt, messages or prompt_completion.")
@click.option("--format", "file_format", default=None,
              help="File format to write: json, jsonl, parquet, csv or hf (default: from DST's extension).")
@click.option("--on-bad-record", type=click.Choice(["fail", "skip", "quarantine"]), default="fail",
              show_default=True, help="What to do with a malformed input record.")
@click.option("--repair", default="none", show_default=True,
              help="Fix conversations that break the turn rules instead of treating them as bad records: none, "
                   "safe (drop_empty_turns, drop_leading_assistant, merge_same_role), all (also "
                   "drop_trailing_user), or repair names separated by commas. Repaired rows list their repairs "
                   "in a `repairs` column.")
def convert(src: Path, dst: Path, to_layout: str, file_format: str | None, on_bad_record: str, repair: str) -> None:
    """Convert SRC (any supported layout and format) into DST with another layout or format."""
    from thresher.data.convert import convert_report

    n, report = convert_report(
        src, dst, to_layout=to_layout, file_format=file_format, on_bad_record=on_bad_record, repair=repair
    )
    click.echo(f"wrote {n} rows to {dst} ({to_layout})")
    left_out = report.skipped + report.quarantined
    if left_out:
        how = "quarantined" if report.quarantined else "skipped"
        where = f" (see {report.quarantine_path})" if report.quarantine_path else ""
        click.echo(f"{how} {left_out} of {report.read} records{where}")
    if any(report.repaired.values()):
        click.echo("repaired: " + ", ".join(f"{k} {v}" for k, v in report.repaired.items() if v))
    if report.repairable_records:
        needed = ", ".join(f"{k} {v}" for k, v in sorted(report.repairable.items()))
        click.echo(f"--repair safe would read {report.repairable_records} of them (needed: {needed})")


@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def inspect(path: Path, as_json: bool) -> None:
    """Show counts, columns and score summaries of a data FILE or a RUN_DIR."""
    if (path / "manifest.json").is_file():
        manifest = json.loads((path / "manifest.json").read_text())
        if as_json:
            click.echo(json.dumps(manifest, indent=2))
        else:
            click.echo(_steps_table(path))
        return
    from thresher.data import summarize

    summary = summarize(path)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


@main.command()
def steps() -> None:
    """List the step names a recipe can use."""
    from thresher.pipelines.registry import _REGISTRY, available_steps

    for name in available_steps():
        doc = (_REGISTRY[name].__doc__ or "").strip().splitlines()
        click.echo(f"{name:24s} {doc[0] if doc else ''}")


@main.group()
def cache() -> None:
    """The LLM request cache (SQLite): stats and clearing."""


@cache.command("stats")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cache file (default: $THRESHER_CACHE, $THRESHER_CACHE_DIR/requests.sqlite or ~/.cache/thresher).")
def cache_stats(path: Path | None) -> None:
    """Rows and bytes stored, per kind of request and model."""
    from thresher.llms.cache import RequestCache, default_cache_path

    target = path or default_cache_path()
    if not target.exists():
        click.echo(f"no cache at {target}")
        return
    store = RequestCache(target)
    stats = store.stats()
    click.echo(f"{stats.path}: {stats.rows} answers, {stats.bytes / 1e6:.1f} MB")
    for row in store.by_model():
        click.echo(f"  {row['kind']:10s} {row['model']:40s} {row['rows']:8d} rows {row['bytes'] / 1e6:8.1f} MB")
    store.close()


@cache.command("clear")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Cache file.")
@click.option("--model", default=None, help="Only the answers of this model.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(path: Path | None, model: str | None, yes: bool) -> None:
    """Delete stored answers (paid-for work: asks first)."""
    from thresher.llms.cache import RequestCache, default_cache_path

    target = path or default_cache_path()
    if not target.exists():
        click.echo(f"no cache at {target}")
        return
    if not yes:
        click.confirm(f"delete {'all' if model is None else model} answers in {target}?", abort=True)
    store = RequestCache(target)
    n = store.clear(model=model)
    store.close()
    click.echo(f"deleted {n} answers")


def _working_copy(run_dir: str) -> Path:
    """The local folder a run in `run_dir` worked in: the folder itself, or an object store's local copy."""
    from thresher.pipelines.run_store import is_remote, mirror_of

    return mirror_of(run_dir) if is_remote(run_dir) else Path(run_dir)


def _write_run_report(run_dir: str, quiet: bool) -> None:
    """report.html at the end of `thresher run`; a report that cannot be written is logged, never a failed run."""
    import logging

    if not (_working_copy(run_dir) / "manifest.json").is_file():  # the run stopped before its first step
        return
    try:
        from thresher.report import write_report

        path = write_report(run_dir)
    except Exception as e:
        logging.getLogger("thresher.report").warning("could not write the run report of %s", run_dir, exc_info=True)
        click.echo(f"warning: the run report was not written: {type(e).__name__}: {e}", err=True)
        return
    if not quiet:
        click.echo(f"report: {path}", err=True)


@main.command()
@click.argument("run_dir")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the HTML file (default: RUN_DIR/report.html).")
def report(run_dir: str, out: Path | None) -> None:
    """Write the HTML report of the run in RUN_DIR (a folder or an object store's URI): one self-contained file
    (figures inside, no network needed)."""
    from thresher.pipelines.run_store import is_remote
    from thresher.report import write_report

    if not is_remote(run_dir) and not Path(run_dir).is_dir():
        raise click.BadParameter(f"{run_dir!r} is not a folder", param_hint="RUN_DIR")

    click.echo(f"wrote {write_report(run_dir, out)}")


def _steps_table(run_dir: Path) -> str:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [("step", "status", "in", "out", "rejected", "failed", "seconds")]
    for name, s in manifest["steps"].items():
        secs = s.get("seconds")
        rows.append((
            name, s["status"], *(str(s.get(k) if s.get(k) is not None else "-")
                                 for k in ("rows_in", "rows_out", "rows_rejected", "rows_failed")),
            f"{secs:.2f}" if isinstance(secs, (int, float)) else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [f"run {run_dir} ({manifest.get('pipeline')})", *lines]
    for name, s in manifest["steps"].items():
        if s.get("error"):
            out.append(f"  {name} failed: {s['error']}")
        usage = s.get("metrics") or {}
        if usage:
            out.append(f"  {name} metrics: " + ", ".join(f"{k}={v}" for k, v in usage.items()))
    return "\n".join(out)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("step")
@click.option("--threshold", type=float, required=True, help="The new cosine threshold (duplicates at or above it).")
@click.option("--grouping", type=click.Choice(["components", "greedy"]), default=None,
              help="Also change how groups are formed (default: as the step ran).")
@click.option("--export", "export", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the rows kept at the new threshold to this file (format from its extension).")
def rethreshold(run_dir: Path, step: str, threshold: float, grouping: str | None, export: Path | None) -> None:
    """NearDedup step STEP of the run in RUN_DIR at another --threshold, from its stored vectors (nothing is
    embedded again; the run directory is not changed)."""
    from thresher.filters.near_dedup import rethreshold as redo
    from thresher.pipelines.runner import open_run

    before = open_run(run_dir).steps.get(step)
    res = redo(run_dir, step, threshold, **({"grouping": grouping} if grouping else {}))
    old = before.params.get("threshold") if before is not None else None
    if before is not None:
        click.echo(f"{step} at threshold {old}: {before.rows_out} kept, {before.rows_rejected} removed")
    click.echo(f"{step} at threshold {threshold}: {res.rows_out} kept, {res.rows_rejected} removed")
    if export is not None:
        from thresher.data import write_records

        n = write_records(res.output, export)
        click.echo(f"wrote {n} rows to {export}")


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory (default: runs/demo-<size>-<language>). Run the same command again to resume.")
@click.option("--size", type=click.Choice(["tiny", "small", "medium"]), default="small", show_default=True,
              help="tiny: a few tasks (CI); small: about 15 minutes on 2 CPU cores; medium: larger.")
@click.option("--language", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="zh: Chinese seed tasks and prompts.")
@click.option("--no-train", is_flag=True, help="Stop after exporting the curated set (no LoRA SFT run).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or step messages.")
def demo(out: Path | None, size: str, language: str, no_train: bool, quiet: bool) -> None:
    """Grow, judge, dedup, select, polish, export and train on instruction data with the bundled models: offline,
    no key (the built-in recipe, thresher/pipelines/recipes/demo.yaml). Ctrl-C and run again to resume."""
    from thresher.pipelines.demo import default_run_dir, run_demo

    run_dir = out or default_run_dir(size, language)
    try:
        res = run_demo(run_dir, size=size, language=language, train=not no_train, progress=not quiet)
    finally:  # an interrupted demo gets its report too (what each step did so far)
        _write_run_report(str(run_dir), quiet)
    click.echo(_steps_table(run_dir))
    click.echo(f"curated set: {res.curated} ({res.curated_rows} rows of {res.final_step}, alpaca layout)")
    for path in res.exports:
        click.echo(f"  for {path.name}: {path}")
    if res.train is not None:
        t = res.train
        loss = f"{t['train_loss']:.4f}" if isinstance(t.get("train_loss"), (int, float)) else "-"
        speed = f"{t['tokens_per_s']:.0f}" if isinstance(t.get("tokens_per_s"), (int, float)) else "-"
        click.echo(f"LoRA SFT ({t['device']}): {t['steps']} steps, last loss {loss}, {speed} tokens/s; adapter {t['adapter']}")


if __name__ == "__main__":
    main()
