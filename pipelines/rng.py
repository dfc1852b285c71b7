"""Seeded randomness that a re-run repeats exactly.

A step that samples (which seed tasks to show, which evolution to apply, which rows to draw) takes a semantic
`seed` parameter and derives one random generator per decision from the seed and the decision's own keys: what it
is for, the row id, the round. `rng(self.seed, "evolve", row_id, round_)` gives the same generator in every process,
whatever was drawn before it, however rows were batched and whichever thread asked first. So a resumed or repeated
run makes the same choices, sends the same prompts, and finds its answers in the request cache instead of paying
for them again. A changed seed changes the step's fingerprint (it is a semantic parameter) and every choice.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING, Any

import orjson

from thresher.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return seed


def derive_seed(seed: int, *keys: Any) -> int:
    """A 64-bit integer determined by `seed` and `keys` (strings, numbers, None, lists of them) alone."""
    blob = orjson.dumps([_check_seed(seed), *keys], option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


def rng(seed: int, *keys: Any) -> random.Random:
    """A `random.Random` for one decision, seeded from (seed, *keys)."""
    return random.Random(derive_seed(seed, *keys))


def np_rng(seed: int, *keys: Any) -> np.random.Generator:
    """A numpy Generator for one decision, seeded from (seed, *keys)."""
    import numpy as np

    return np.random.default_rng(derive_seed(seed, *keys))


def sample_seed(seed: int, *keys: Any) -> int:
    """A non-negative 31-bit sampling seed for a model request (servers take a signed 32-bit seed)."""
    return derive_seed(seed, "sample", *keys) & 0x7FFFFFFF
