"""The iterative loop at tiny size on the CPU: each round the current model (the base, then the previous round's
adapter through the Transformers backend) answers, a filter curates, the trainer trains, held-out loss compares with
the model before. Killed with SIGKILL in round 1's training, it resumes there (round 0 untouched, the trainer from its
checkpoint); a round that does not improve stops the loop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from thresher.errors import BackendError, ConfigError
from thresher.evaluation.iterate import iterate
from thresher.llms.testing import FaultServer
from thresher.llms.vllm_lora import load_lora_adapter
from thresher.trainer.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("isolated_cache")

DEMO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"


def _recipe(tmp_path: Path, smol: Path, *, min_improvement: float, max_steps: int = 2,
            serve: dict[str, Any] | None = None) -> Path:  # fmt: skip
    rows = json.loads(DEMO.read_text())
    (tmp_path / "heldout.json").write_text(json.dumps(rows[300:302]))
    data = {"name": "loop-data", "steps": {
        "load": {"step": "Load", "params": {"path": str(DEMO), "limit": 2}},
        "respond": {"step": "Respond", "params": {"max_tokens": 8, "temperature": 0.0}},
        "curate": {"step": "LengthFilter", "params": {"min_chars": 1}},
    }}  # fmt: skip
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))  # step order is DAG order
    recipe = {"name": "loop", "data": "data.yaml",
              "train": {"model": str(smol), "max_seq_len": 64, "micro_batch_tokens": 256, "lora_r": 4, "lora_alpha": 8,
                        "lora_dropout": 0.0, "learning_rate": 2e-3, "warmup_ratio": 0.0, "max_steps": max_steps,
                        "save_every": 1, "device": "cpu"},
              "eval": {"heldout": "heldout.json"},
              "iterate": {"model_steps": ["respond"], "min_improvement": min_improvement,
                          "backend": {"device": "cpu"}, **(serve or {})}}  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_killed_loop_resumes_at_the_round_and_step(smol_hf_dir: Path, tmp_path: Path) -> None:
    path = _recipe(tmp_path, smol_hf_dir, min_improvement=-100.0, max_steps=3)  # every round goes on
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    code = f"from thresher.evaluation.iterate import iterate; iterate({str(path)!r}, {str(run)!r}, rounds=2)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    deadline = time.monotonic() + 600
    while not list_checkpoints(run / "round-1" / "train"):
        assert proc.poll() is None, "the loop ended before round 1 trained"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    round0 = run / "round-0" / "round.json"
    first = round0.read_text()
    assert not (run / "round-1" / "round.json").exists()
    mtime = round0.stat().st_mtime_ns
    state = iterate(path, run, rounds=2)
    assert round0.stat().st_mtime_ns == mtime and round0.read_text() == first  # round 0 was not run again
    r0, r1 = state["rounds"]
    assert r1["train"]["start_step"] >= 1 and r1["train"]["steps"] == 3  # the trainer went on from its checkpoint
    assert r1["made_by"] == r0["adapter"]  # round 1's data came from round 0's adapter
    assert r1["previous_heldout_loss"] == r0["heldout_loss"]
    assert state["best_round"] == 1 and state["stopped"] == "ran the 2 rounds asked for"
    rows0 = json.loads((run / "round-0" / "train.json").read_text())
    rows1 = json.loads((run / "round-1" / "train.json").read_text())
    assert len(rows0) == len(rows1) == 2
    assert [r["instruction"] for r in rows0] == [r["instruction"] for r in rows1]
    assert json.loads((run / "iterate.json").read_text()) == state
    page = (run / "round-1" / "report.html").read_text()  # the last round's report shows every round
    assert "Iterative loop: best round 1" in page and r0["comparison"] in page


def test_a_round_that_does_not_improve_stops_the_loop(smol_hf_dir: Path, tmp_path: Path) -> None:
    path = _recipe(tmp_path, smol_hf_dir, min_improvement=100.0)  # no round can gain 100 nats
    state: dict[str, Any] = iterate(path, tmp_path / "run", rounds=3)
    (r0,) = state["rounds"]
    assert not r0["improved"] and r0["gain"] == pytest.approx(r0["previous_heldout_loss"] - r0["heldout_loss"])
    assert state["best_round"] is None and state["stopped"].startswith("round 0 did not improve")
    assert not (tmp_path / "run" / "round-1").exists()


def test_iterate_checks_its_recipe(smol_hf_dir: Path, tmp_path: Path) -> None:
    path = _recipe(tmp_path, smol_hf_dir, min_improvement=0.0)
    recipe = yaml.safe_load(path.read_text())
    recipe["iterate"]["model_steps"] = ["answer"]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ConfigError, match=r"model_steps names \['answer'\], not steps of"):
        iterate(path, tmp_path / "run", rounds=1)


def test_loop_served_by_vllm_loads_each_rounds_adapter(smol_hf_dir: Path, tmp_path: Path) -> None:
    # a server speaking vLLM's API (chat completions and runtime LoRA loading) answers as the current model: round 0
    # asks the base, round 1 first loads round 0's adapter and asks it by its name; a resumed loop loads it again
    with FaultServer(model="base") as server:
        vllm = {"base_url": server.base_url, "model": "base", "max_concurrency": 2}
        path = _recipe(tmp_path, smol_hf_dir, min_improvement=-100.0, serve={"serve": "vllm", "vllm": vllm})
        state = iterate(path, tmp_path / "run", rounds=2)
        r0, r1 = state["rounds"]
        stats = server.stats()
        (name,) = stats["loras"]
        assert name.startswith("loop-round-0-") and Path(stats["loras"][name]) == Path(r0["adapter"]).resolve()
        assert (r0["answered_by"], r1["answered_by"]) == ("base", name)
        models = {b.get("model") for b in stats["bodies"]}
        assert name in models  # round 1's rows were asked of the adapter
        rows1 = json.loads((tmp_path / "run" / "round-1" / "train.json").read_text())
        assert all(r["output"].startswith("reply to") for r in rows1)  # the server's answers are the data
        # the same name again (a resumed run) is accepted; a server without runtime LoRA loading says what to set
        assert load_lora_adapter(vllm, name, r0["adapter"])["model"] == name
        server.configure(lora_updating=False)
        with pytest.raises(BackendError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            load_lora_adapter(vllm, "other", r0["adapter"])
    bad = yaml.safe_load(path.read_text())
    bad["iterate"]["vllm"] = {"model": "base"}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"needs iterate\.vllm\.base_url"):
        iterate(path, tmp_path / "run2", rounds=1)
