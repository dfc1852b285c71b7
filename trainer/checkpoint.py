"""Checkpoints that hold everything a resumed run needs, written atomically.

A checkpoint is a directory `checkpoints/step-00000010/` holding the adapter as peft saves it (usable on its own),
`training_state.pt` (optimizer, scheduler, and the RNG states of Python, torch and CUDA) and `trainer_state.json`
(step, data position, token counts, the config). It is written into a hidden temporary directory beside it and
moved into place with os.replace, so a run killed at any moment leaves either a complete checkpoint or none;
`latest_checkpoint` only ever sees complete ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
TENSOR_STATE_FILE = "training_state.pt"


def checkpoint_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def save_checkpoint(
    output_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: dict[str, Any],
    *,
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the `keep` most recent."""
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
        tmp / TENSOR_STATE_FILE,
    )
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    replace_dir(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, moving an existing `final` aside first rather than deleting it.

    A directory under its final name is therefore always complete; a kill between the two renames leaves both
    copies complete under their hidden names (.old-..., .tmp-...), which the next save clears away.
    """
    _fsync_tree(tmp)
    aside = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted writes are ignored)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG states from `path`; return the trainer state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in model.parameters() if p.requires_grad)
    weights = load_file(path / "adapter_model.safetensors", device=str(device))
    result = set_peft_model_state_dict(model, weights)
    missing_adapter = [k for k in getattr(result, "missing_keys", []) if "lora_" in k or "prompt" in k]
    if missing_adapter:
        raise RuntimeError(f"{path}: checkpoint lacks adapter weights {missing_adapter[:3]}")
    tensors = torch.load(path / TENSOR_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    _set_rng_state(tensors["rng"])
    return read_state(path)


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    """Flush a directory's files and the directory itself, so a crash right after the rename cannot lose them."""
    for child in path.iterdir():
        if child.is_file():
            _fsync(child)
    _fsync(path)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)
