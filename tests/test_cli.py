"""The `thresher` command: run, inspect, convert, steps, help text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from thresher.cli import main

TESTS = Path(__file__).parent


def write_recipe(path: Path, n: int = 50, min_chars: int = 3) -> Path:
    path.write_text(
        "name: cli_test\n"
        "steps:\n"
        "  numbers:\n"
        "    step: pipeline_steps:Numbers\n"
        f"    params: {{n: {n}}}\n"
        "  stats:\n"
        "    step: TextStats\n"
        "  long:\n"
        "    step: LengthFilter\n"
        f"    params: {{min_chars: {min_chars}}}\n"
    )
    return path


def test_every_command_has_help() -> None:
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for cmd in ("run", "convert", "inspect", "steps", "train", "export"):
        assert cmd in top.output
    for cmd in ("run", "convert", "inspect", "steps"):
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage:" in res.output, cmd


def test_run_twice_then_inspect(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(TESTS))
    recipe = write_recipe(tmp_path / "r.yaml")
    runner = CliRunner()
    out = tmp_path / "run"
    first = runner.invoke(main, ["run", str(recipe), "--out", str(out), "-q"])
    assert first.exit_code == 0, first.output
    assert "done" in first.output and "output of long:" in first.output
    second = runner.invoke(main, ["run", str(recipe), "--out", str(out), "-q"])
    assert second.exit_code == 0
    lines = [ln for ln in second.output.splitlines() if ln.startswith(("numbers", "stats", "long"))]
    assert len(lines) == 3 and all(" cached " in ln for ln in lines), second.output

    shown = runner.invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 0 and "long" in shown.output
    as_json = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert as_json["steps"]["long"]["rows_in"] == 50


def test_bad_recipe_is_one_clear_error(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps:\n  s:\n    step: LengthFilter\n    params: {min_chars: many}\n")
    res = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "bad.yaml:4 steps.s.params.min_chars" in res.output
    assert "Traceback" not in res.output


def test_entry_point_installed() -> None:
    proc = subprocess.run([sys.executable, "-m", "thresher.cli", "steps"], capture_output=True, text=True, check=True)
    assert "LengthFilter" in proc.stdout and "ExactDedup" in proc.stdout


def test_cache_stats_and_clear(tmp_path: Path) -> None:
    from thresher.llms.cache import RequestCache

    path = tmp_path / "requests.sqlite"
    store = RequestCache(path)
    store.put("k1", b"answer one", kind="chat", model="smollm2")
    store.put("k2", b"answer two", kind="embed", model="minilm")
    store.flush()
    store.close()
    runner = CliRunner()
    shown = runner.invoke(main, ["cache", "stats", "--path", str(path)])
    assert shown.exit_code == 0 and "2 answers" in shown.output and "smollm2" in shown.output
    refused = runner.invoke(main, ["cache", "clear", "--path", str(path)], input="n\n")
    assert refused.exit_code != 0  # paid-for answers are not deleted without a yes
    cleared = runner.invoke(main, ["cache", "clear", "--path", str(path), "--model", "smollm2", "--yes"])
    assert cleared.exit_code == 0 and "deleted 1 answers" in cleared.output
