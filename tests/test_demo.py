"""`thresher demo --size tiny`: the built-in recipe end to end on the bundled models (in-process llama.cpp SmolLM2,
the same model in transformers for IFD/DEITA and the trainer, MiniLM), offline. Every step of the recipe ran and
balances its rows as the manifest records them and as the shards on disk hold them; the report, the curated export
and the LoRA adapter exist; running the same command again resumes (every step cached, training not redone)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from thresher.cli import main
from thresher.pipelines.demo import demo_pipeline
from thresher.pipelines.runner import open_run

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]


@pytest.fixture(autouse=True)
def _llama_cpp_runs_here() -> None:
    from thresher.llms import smollm2_gguf
    from thresher.llms.native_probe import ensure_llama_cpp_runs

    ensure_llama_cpp_runs(smollm2_gguf())


def test_demo_tiny_runs_every_step_and_balances_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["demo", "--size", "tiny", "--out", str(out)], catch_exceptions=False)
    seconds = time.perf_counter() - t0
    print(res.output)
    print(f"thresher demo --size tiny: {seconds:.0f} s")
    assert res.exit_code == 0, res.output

    pipeline = demo_pipeline("tiny", "en")
    run = open_run(out)
    assert list(run.steps) == list(pipeline.nodes)  # every step of the recipe, in order
    for name, rec in run.steps.items():
        assert rec.status == "done", (name, rec.status, rec.error)
        n_out, n_rej, n_fail = (run.table(name).num_rows, run.rejected(name).num_rows, run.failed(name).num_rows)
        assert (rec.rows_out, rec.rows_rejected, rec.rows_failed) == (n_out, n_rej, n_fail), name  # manifest = shards
        parents = pipeline.nodes[name].parents
        if parents:  # a step reads exactly what its parents kept
            assert rec.rows_in == sum(run.steps[p].rows_out for p in parents), name
        if rec.candidates is not None:  # generators: every candidate is output, rejected (with reason) or failed
            assert rec.candidates == n_out + n_rej + n_fail, name
        elif name != "pool":  # Concat joins rather than filters: it says its own counts (in = out)
            assert rec.rows_in == n_out + n_rej + n_fail, name
        if n_rej:
            rejected = run.rejected(name)
            assert all(rejected.column("reason").to_pylist()), name
    assert run.steps["self_instruct"].rows_out > 0  # the bundled model grew at least one task
    assert run.steps["select"].rows_out == run.steps["random_baseline"].rows_out  # the baseline has the same size

    curated = json.loads((out / "curated.json").read_text())
    assert len(curated) == run.steps["realign"].rows_out > 0
    assert all(r["instruction"] and r["output"] for r in curated)
    assert (out / "export" / "trl" / "demo.jsonl").is_file()
    assert (out / "export" / "llama-factory" / "dataset_info.json").is_file()
    assert (out / "report.html").stat().st_size > 10_000
    assert (out / "train" / "adapter").is_dir() and (out / "train" / "metrics.jsonl").is_file()
    assert json.loads((out / "train" / "_done.json").read_text())["steps"] == 2
    assert "LoRA SFT" in res.output and "self_instruct" in res.output

    again = CliRunner().invoke(main, ["demo", "--size", "tiny", "--out", str(out)], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert all(rec.status == "cached" for rec in open_run(out).steps.values())


def test_demo_ctrl_c_then_the_same_command_resumes(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) in the middle of the demo, then the same command: the steps finished before the interrupt
    are not run again, and the run completes with every step done."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "thresher.cli", "demo", "--size", "tiny", "--out", str(out), "--no-train", "-q"]
    # SIGINT back to its default in the child: a shell's background job (CI scripts) starts with it ignored, and
    # Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 900
    finished: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            steps = open_run(out).steps
        except Exception:  # no manifest yet
            steps = {}
        finished = [n for n, rec in steps.items() if rec.status == "done"]
        if "self_instruct" in finished:
            break
        time.sleep(0.5)
    assert proc.poll() is None, f"the demo ended before it could be interrupted: {proc.stdout.read()!r}"  # type: ignore[union-attr]
    assert "self_instruct" in finished, "self_instruct did not finish within 15 minutes"
    # Ctrl-C, and again a second later while it still runs, as a user would: a SIGINT that lands inside
    # `import transformers` is swallowed by its lazy-import machinery
    for _ in range(120):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            continue
    output = proc.communicate(timeout=300)[0].decode(errors="replace")
    assert proc.returncode != 0, output  # interrupted, not finished
    interrupted = open_run(out).steps
    assert not all(rec.status == "done" for rec in interrupted.values()), "the interrupt came too late to test resume"
    done_before = [n for n, rec in interrupted.items() if rec.status == "done"]

    again = CliRunner().invoke(main, ["demo", "--size", "tiny", "--out", str(out), "--no-train"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    resumed = open_run(out).steps
    assert all(rec.status in ("done", "cached") for rec in resumed.values())
    assert all(resumed[n].status == "cached" for n in done_before), {n: resumed[n].status for n in done_before}
    assert (out / "curated.json").is_file()
