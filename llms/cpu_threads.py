"""How many CPU threads llama.cpp gets for batched decoding: measured while decoding, not guessed once.

llama.cpp's threads spin-wait for each other at every step of the graph, so more threads are only faster while they
have cores to themselves. On a quiet 2-core machine 2 threads decode 8 sequences about 1.8x faster than 1; with
another job on the second core, 2 threads were slower than 1 (and a process that asks for more threads than the
cores it may use is slower still). Which is right depends on what else the machine runs at the time, so
`ThreadTuner` tries the neighbouring thread counts on real decode steps every few seconds (or at once when a step
suddenly takes twice as long as the one before) and keeps the fastest.

The thread count does not change the numbers: llama.cpp computes each output element on one thread, in one order,
however the rows are shared out (measured: bit-identical logits with 1 and 2 threads), so switching mid-sequence
changes speed only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path


def usable_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, counting hyperthread siblings once, capped by a
    cgroup CPU quota (a container given 2 CPUs of a 64-core host). llama.cpp's own default is the physical cores;
    hyperthreads share a core's vector units, so they add little to its matmuls."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores = set()
            break
    n = len(cores) if cores else max(1, len(cpus) // 2 if len(cpus) > 2 else len(cpus))
    quota = _cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time a cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us`) limit allows, None when unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        p = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if q <= 0 or p <= 0 else q / p
    except (OSError, ValueError):
        return None


class ThreadTuner:
    """Chooses the thread count of each decode step of generating sequences.

    - most: the most threads to try (`usable_cores()`); the tuner starts there, as llama.cpp would.
    - every_s: seconds of decoding between two trials.
    - gain: how much faster (a fraction) more threads must be to be kept; less than that, fewer threads win and
      leave the other cores to the rest of the machine.

    A trial runs a few consecutive steps of the same size (same number of tokens, so the same cost but for the
    threads), alternating the current count and its neighbours (half and double, within 1..most), and keeps the
    fastest by each count's quickest step. A neighbour more than 1.5x slower on its first step is dropped from the
    trial, so a bad count costs one step, not several.

    Use: `t = tuner.threads(n_tokens)` before a step, `tuner.record(t, n_tokens, seconds)` after it.
    """

    def __init__(
        self, most: int, *, every_s: float = 5.0, gain: float = 0.05, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.most = max(1, int(most))
        self.current = self.most
        self.every_s = float(every_s)
        self.gain = float(gain)
        self._clock = clock
        self._plan: list[int] = []  # thread counts of the trial's remaining steps
        self._trial: dict[int, list[float]] = {}
        self._trial_size = 0
        self._last_trial = -math.inf
        self._last_step: dict[int, float] = {}  # the latest step's seconds at each size, outside trials
        self._due = True
        self.trials = 0  # trials completed, for tests and `/health`

    def threads(self, n_tokens: int) -> int:
        if not self._plan and self.most > 1 and (self._due or self._clock() - self._last_trial >= self.every_s):
            self._start(n_tokens)
        if self._plan and n_tokens != self._trial_size:
            # the batch changed size mid-trial (a sequence left or joined): its steps no longer compare
            self._plan, self._due = [], True
        return self._plan[0] if self._plan else self.current

    def record(self, threads: int, n_tokens: int, seconds: float) -> None:
        if not self._plan:
            before = self._last_step.get(n_tokens)
            self._last_step[n_tokens] = seconds
            if before is not None and seconds > 2 * before and self._clock() - self._last_trial >= 1.0:
                self._due = True  # the machine got busier (or freer): try again now
            return
        if threads != self._plan[0] or n_tokens != self._trial_size:
            return
        self._plan.pop(0)
        self._trial.setdefault(threads, []).append(seconds)
        base = self._trial.get(self.current)
        if threads != self.current and base and seconds > 1.5 * min(base):
            self._plan = [t for t in self._plan if t != threads]
        if not self._plan:
            self._decide()

    def _start(self, n_tokens: int) -> None:
        near = sorted({max(1, self.current // 2), min(self.most, self.current * 2)} - {self.current})
        self._plan = [self.current, *near] * 2
        self._trial, self._trial_size, self._due = {}, n_tokens, False

    def _decide(self) -> None:
        best = {t: min(s) for t, s in self._trial.items()}
        choice = min(best)
        for t in sorted(best):  # more threads must earn their cores
            if t > choice and best[t] < (1 - self.gain) * best[choice]:
                choice = t
        self.current = choice
        self._last_trial = self._clock()
        self._last_step.clear()
        self.trials += 1
