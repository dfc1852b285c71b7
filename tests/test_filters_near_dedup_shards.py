"""NearDedup with `shards`: dedup within k-means clusters (for inputs too large for one index), against the exact
search over all rows, on clustered vectors with planted near-copies."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from thresher.errors import ConfigError
from thresher.filters import NearDedup
from thresher.filters.near_dedup import find_pairs, sharded_pairs


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def topics(n: int, d: int, k: int, copies: int, seed: int) -> np.ndarray:
    """Rows around k topic centres (as real instruction sets are), plus `copies` near-copies (cosine 0.9-0.99)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, d)))
    base = unit(centres[rng.integers(0, k, n - copies)] + 0.9 * unit(rng.standard_normal((n - copies, d))))
    src = rng.integers(0, n - copies, copies)
    near = unit(base[src] + rng.uniform(0.15, 0.45, (copies, 1)) * unit(rng.standard_normal((copies, d))))
    return unit(np.concatenate([base, near])[rng.permutation(n)])


def pair_set(p: object) -> set[tuple[int, int]]:
    return set(zip(p.i.tolist(), p.j.tolist(), strict=True))  # type: ignore[attr-defined]


def test_sharded_pairs_are_true_pairs_and_miss_few() -> None:
    x = topics(3000, 32, 8, 300, seed=1)
    exact = pair_set(find_pairs(x, 0.9, index="flat"))
    got = sharded_pairs(x, 0.9, shards=8, index="flat")
    found = pair_set(got)
    assert found <= exact  # nothing invented: every pair is at cosine >= 0.9
    recall = len(found) / len(exact)
    print(f"{len(exact)} pairs in all, {len(found)} within 8 shards (recall {recall:.3f}), largest shard "
          f"{got.stats['largest_shard']} of 3000 rows")
    assert recall >= 0.95
    assert got.stats["shards"] == 8 and got.stats["largest_shard"] < 3000
    assert np.all(np.diff(got.i) >= 0) and np.all(got.i < got.j)  # ordered as find_pairs orders them
    # one shard is the unsharded search
    assert pair_set(sharded_pairs(x, 0.9, shards=1, index="flat")) == exact


def test_near_dedup_with_shards_in_a_step() -> None:
    x = topics(2000, 32, 6, 200, seed=2)
    table = pa.table({"id": [f"r{i}" for i in range(len(x))], "vec": pa.array(list(x), pa.list_(pa.float32()))})
    whole = NearDedup(vectors="vec", index="flat").apply(table)
    step = NearDedup(vectors="vec", index="flat", shards=6)
    sharded = step.apply(table)
    assert sharded.rows_in == sharded.rows_out + sharded.rows_rejected == 2000
    assert sharded.metrics["shards"] == 6
    # a pair across clusters is missed, so sharding may keep a few more rows, never drop one the full search keeps
    kept_whole = set(whole.output.column("id").to_pylist())
    kept_sharded = set(sharded.output.column("id").to_pylist())
    assert kept_whole <= kept_sharded and len(kept_sharded - kept_whole) <= 0.05 * whole.rows_rejected
    for reason in sharded.rejected.column("reason").to_pylist()[:20]:
        assert reason.startswith("near duplicate of kept row")
    # a semantic parameter: another fingerprint; unsharded, the fingerprint of runs made before the option
    assert step.fingerprint() != NearDedup(vectors="vec", index="flat").fingerprint()
    assert "shards" not in NearDedup(vectors="vec").semantic_params()
    with pytest.raises(ConfigError, match="shards"):
        NearDedup(vectors="vec", shards=0).check()
