"""Training metrics: throughput, MFU, peak memory; written as JSON lines and TensorBoard events.

MFU = achieved model FLOP/s / the device's peak dense FLOP/s. For LoRA a token costs about 4N FLOPs (2N forward,
2N for the activation gradients; frozen weights get no weight gradient), N being the weights that do a matmul per
token. Peaks are dense (no sparsity) tensor-core figures from the vendors' data sheets.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("thresher.trainer")

# Peak dense TFLOP/s by GPU name fragment: bf16 tensor cores (fp16 on V100 and T4, which lack bf16), tf32 tensor
# cores, and plain fp32 on CUDA cores. An fp32 run counts against the fp32 figure unless TF32 matmuls are switched on
# (torch.set_float32_matmul_precision("high") or allow_tf32): torch leaves them off and the trainer does not touch it.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "tf32": 494.5, "fp32": 67.0},
    "B200": {"bf16": 2250.0, "tf32": 1125.0, "fp32": 75.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "A10G": {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2},
    "A10": {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2},
    "L40S": {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
    "RTX 4090": {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6},
    "RTX 3090": {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6},
    "V100": {"bf16": 125.0, "tf32": 15.7, "fp32": 15.7},  # no TF32 tensor cores
    "T4": {"bf16": 65.0, "tf32": 8.1, "fp32": 8.1},  # no TF32 tensor cores
}


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """The device's peak for `precision` ('bf16' or 'fp32'): the override, else the table; None if unknown.

    For 'fp32' the TF32 figure applies when torch would run fp32 matmuls on TF32 tensor cores.
    """
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    if precision == "fp32" and (torch.get_float32_matmul_precision() != "highest"
                                or torch.backends.cuda.matmul.allow_tf32):
        precision = "tf32"
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS.items():  # ordered so "H100 PCIe" wins over "H100", "A100" over "A10"
        if fragment in name:
            return peaks[precision]
    log.warning("no peak FLOP/s known for %r: MFU is not reported (set peak_tflops)", name)
    return None


def mfu(tokens_per_s: float, matmul_params: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of a LoRA run (4N FLOPs per token)."""
    if peak is None:
        return None
    return 4.0 * matmul_params * tokens_per_s / (peak * 1e12)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard when available."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, resume_step: int = 0) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._drop_after(resume_step)
        self._file = self.path.open("a")
        self._tb: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed: metrics go to %s only", self.path)

    def _drop_after(self, step: int) -> None:
        """Forget records past the step a run resumes from: that work is being redone, and a log that shows steps
        twice (or a fresh run's log after an old one) would be read as training that happened."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except ValueError:  # a line cut by the kill that ended the previous run
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            prefix = "eval" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
