"""The batched decoder's thread count: chosen by measured step times, kept when the machine is quiet, dropped when
it gets busy, and never at a cost of more than a step or two of a bad count."""

from __future__ import annotations

import os

from thresher.llms.cpu_threads import ThreadTuner, usable_cores


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def decode(tuner: ThreadTuner, clock: Clock, seconds, steps: int, n_tokens: int = 8) -> list[int]:
    """Runs `steps` decode steps whose time is `seconds(threads)`; returns the thread count of each."""
    used = []
    for _ in range(steps):
        t = tuner.threads(n_tokens)
        s = seconds(t)
        clock.now += s
        tuner.record(t, n_tokens, s)
        used.append(t)
    return used


def test_usable_cores_is_at_least_one_and_at_most_the_cpus_this_process_may_use():
    n = usable_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


def test_a_quiet_machine_keeps_every_core_and_a_busy_one_drops_to_one_thread():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    assert tuner.current == 2  # starts where llama.cpp would
    quiet = {1: 0.080, 2: 0.045}.__getitem__  # measured here: 8 sequences, 1 and 2 threads
    used = decode(tuner, clock, quiet, 40)
    assert tuner.trials == 1 and tuner.current == 2
    # the trial: 2, 1 (1.8x slower, so not tried again), 2; then the faster count
    assert used[:3] == [2, 1, 2] and used[3:] == [2] * 37

    busy = {1: 0.080, 2: 0.160}.__getitem__  # another job on the second core: 2 threads wait on each other
    used = decode(tuner, clock, busy, 10)
    assert tuner.current == 1 and tuner.trials == 2  # the sudden doubling started a trial at once
    assert used[-5:] == [1] * 5

    # the job ends: the next scheduled trial (every 5 s) finds the second core again
    used = decode(tuner, clock, quiet, 200)
    assert tuner.current == 2 and used[-1] == 2


def test_more_threads_must_be_clearly_faster_to_be_kept():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    decode(tuner, clock, {1: 0.050, 2: 0.049}.__getitem__, 10)  # 2% faster: not worth a core
    assert tuner.current == 1
    clock.now += 10
    decode(tuner, clock, {1: 0.050, 2: 0.030}.__getitem__, 10)
    assert tuner.current == 2


def test_a_count_far_slower_than_the_current_one_is_tried_once_per_trial():
    clock = Clock()
    tuner = ThreadTuner(8, clock=clock)
    used = decode(tuner, clock, {4: 0.500, 8: 0.040, 16: 0.040}.__getitem__, 6)
    assert used.count(4) == 1 and tuner.current == 8  # 8 is the most: its neighbours are 4 only


def test_on_many_cores_the_count_climbs_down_one_halving_per_trial():
    clock = Clock()
    tuner = ThreadTuner(16, clock=clock, every_s=1.0)
    cost = {1: 0.40, 2: 0.20, 4: 0.10, 8: 0.12, 16: 0.30}  # an oversubscribed 16: best at 4
    for _ in range(6):
        decode(tuner, clock, cost.__getitem__, 40)
    assert tuner.current == 4


def test_a_batch_that_changes_size_mid_trial_restarts_the_trial():
    clock = Clock()
    tuner = ThreadTuner(2, clock=clock)
    assert tuner.threads(8) == 2
    tuner.record(2, 8, 0.045)
    assert tuner.threads(7) == 2  # a sequence left: the trial is dropped, the current count decodes
    tuner.record(2, 7, 0.042)
    assert tuner.trials == 0
    decode(tuner, clock, {1: 0.070, 2: 0.042}.__getitem__, 6, n_tokens=7)
    assert tuner.trials == 1 and tuner.current == 2


def test_one_core_never_tries_anything():
    clock = Clock()
    tuner = ThreadTuner(1, clock=clock)
    assert decode(tuner, clock, lambda t: 0.05, 20) == [1] * 20 and tuner.trials == 0
