"""Quarantined records of a run go to the run directory, never beside the input (which may be read-only)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import orjson
import pytest

from thresher.data import Load
from thresher.pipelines import Pipeline

GOOD = b'{"instruction": "Say hi.", "output": "Hi!"}'
BAD = b'{"instruction": 42, "output": "y"}'


@pytest.fixture
def read_only_input(tmp_path: Path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    path = folder / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD, BAD, GOOD.replace(b"hi", b"bye")]) + b"\n")
    folder.chmod(0o555)
    yield path
    folder.chmod(0o755)


def _writable(folder: Path) -> bool:
    """False where the chmod holds; a root user writes anyway, so the test then checks where the file went."""
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except PermissionError:
        return False
    probe.unlink()
    return True


def test_a_run_quarantines_into_its_step_folder_and_the_manifest_names_the_file(
    read_only_input: Path, tmp_path: Path
) -> None:
    folder = read_only_input.parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o555
    pipeline = Pipeline("quarantine")
    pipeline.add(Load(path=str(read_only_input), on_bad_record="quarantine"), name="load")
    run_dir = tmp_path / "run"
    pipeline.run(run_dir, progress=False)

    manifest = json.loads((run_dir / "manifest.json").read_text())
    step = manifest["steps"]["load"]
    assert step["status"] == "done" and step["rows_out"] == 2
    metrics = step["metrics"]
    assert metrics["quarantined"] == 1
    q = Path(metrics["quarantine_path"])
    assert q == run_dir / step["dir"] / "quarantine.jsonl"
    [entry] = [orjson.loads(line) for line in q.read_bytes().splitlines()]
    assert (entry["file"], entry["line"], entry["field"]) == (str(read_only_input), 2, "instruction")
    # nothing beside the input, whether or not the folder could have taken it (root ignores the mode)
    assert sorted(p.name for p in folder.iterdir()) == ["data.jsonl"]
    if not _writable(folder):
        assert os.access(q, os.R_OK)  # and the run did not fail on the read-only folder


def test_a_cached_rerun_keeps_naming_the_quarantine_file(read_only_input: Path, tmp_path: Path) -> None:
    def run() -> dict:
        p = Pipeline("quarantine")
        p.add(Load(path=str(read_only_input), on_bad_record="quarantine"), name="load")
        p.run(tmp_path / "run", progress=False)
        return json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"]["load"]

    first, second = run(), run()
    assert second["status"] == "cached"
    assert second["metrics"]["quarantine_path"] == first["metrics"]["quarantine_path"]
    assert Path(second["metrics"]["quarantine_path"]).is_file()


def test_an_explicit_quarantine_path_wins_in_a_run(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD + b"\n" + BAD + b"\n")
    target = tmp_path / "mine" / "bad.jsonl"
    p = Pipeline("quarantine")
    p.add(Load(path=str(data), on_bad_record="quarantine", quarantine_path=str(target)), name="load")
    p.run(tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "manifest.json").read_text())["steps"]["load"]["metrics"]
    assert metrics["quarantine_path"] == str(target) and target.is_file()


def test_standalone_load_keeps_quarantining_beside_the_input(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD + b"\n" + BAD + b"\n")
    step = Load(path=str(data), on_bad_record="quarantine")
    assert step.workdir_ is None
    assert step().num_rows == 1
    assert step.metrics()["quarantine_path"] == str(tmp_path / "data.jsonl.quarantine.jsonl")
    assert (tmp_path / "data.jsonl.quarantine.jsonl").is_file()


def test_the_run_folder_is_no_parameter(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(GOOD + b"\n")
    step = Load(path=str(data), on_bad_record="quarantine")
    fp = step.fingerprint()
    step.workdir_ = tmp_path / "run" / "steps" / "load-0123"
    assert step.fingerprint() == fp
    assert "workdir_" not in step.get_params()
