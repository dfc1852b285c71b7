"""Evaluation end to end with the bundled SmolLM2-135M: a 2-step LoRA adapter (served by the Transformers backend)
against the base model behind the real llama.cpp server, judged by the same server in both orders on two Vicuna
prompts; held-out loss equals the trainer's own eval loss on the same rows and moves with the adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.usefixtures("isolated_cache")

DEMO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llama-factory-demo" / "alpaca_en_demo.json"


@pytest.fixture(scope="module")
def adapter_run(smol_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from thresher.trainer import TrainConfig, train

    tmp = tmp_path_factory.mktemp("eval-train")
    rows = json.loads(DEMO.read_text())
    heldout = tmp / "heldout.json"
    heldout.write_text(json.dumps(rows[100:103]))
    cfg = TrainConfig(model=str(smol_hf_dir), dataset=str(DEMO), max_rows=4, eval_dataset=str(heldout), max_seq_len=64,
                      micro_batch_tokens=256, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=2e-3,
                      warmup_ratio=0.0, max_steps=2, output_dir=str(tmp / "train"), progress_bar=False,
                      tensorboard=False)  # fmt: skip
    return {"result": train(cfg), "heldout": heldout, "dir": tmp}


def test_heldout_loss_is_the_trainers_eval_loss(adapter_run: dict[str, Any], smol_hf_dir: Path) -> None:
    from thresher.evaluation import heldout_loss
    from thresher.evaluation.heldout import heldout_row_losses

    res = adapter_run["result"]
    tuned = heldout_loss(str(smol_hf_dir), adapter_run["heldout"], adapter=res.adapter_dir, max_seq_len=64, device="cpu")
    base = heldout_loss(str(smol_hf_dir), adapter_run["heldout"], max_seq_len=64, device="cpu")
    assert tuned == pytest.approx(res.eval_loss, abs=1e-4)
    assert math.isfinite(base) and abs(base - tuned) > 1e-4  # the adapter is applied
    # per-row parts (for paired bootstrap intervals) add up to the same token-weighted mean
    rows = heldout_row_losses(str(smol_hf_dir), adapter_run["heldout"], adapter=res.adapter_dir, max_seq_len=64,
                              device="cpu")  # fmt: skip
    assert len(rows) == 3 and sum(s for _, s, _ in rows) / sum(n for _, _, n in rows) == pytest.approx(tuned, abs=1e-4)


def test_adapter_against_base_judged_by_the_bundled_model(
    adapter_run: dict[str, Any], smol_hf_dir: Path, llama_server: str, shared_data: Path
) -> None:
    from thresher.evaluation import pairwise_eval

    adapter = adapter_run["result"].adapter_dir
    tuned = {"kind": "transformers", "model": str(smol_hf_dir), "adapter": str(adapter), "device": "cpu"}
    base = {"kind": "openai", "base_url": llama_server, "model": "smollm2"}
    judge = {"kind": "openai", "base_url": llama_server, "model": "smollm2-judge"}
    out = adapter_run["dir"] / "eval"
    result = pairwise_eval(tuned, base, judge=judge, test_sets=["vicuna"], data_dir=shared_data / "cherry-llm",
                           max_prompts=2, names=("tuned", "base"), answer_max_tokens=24, judge_max_tokens=400,
                           structured=True, heldout=adapter_run["heldout"], heldout_max_seq_len=64,
                           out_dir=out)  # fmt: skip
    (s,) = result.sets
    print(result.table())
    # in free text the 135M judge rarely writes two scores; through the server's grammar every reply has them (the
    # reason is capped at 300 characters, so 400 tokens always reach the scores)
    assert s.n == 2 and s.failed == 0 and s.wins + s.ties + s.losses == s.n
    for p in s.pairs:
        assert p.answer_a and p.answer_b  # both models answered over their own backends
        assert all(r is not None for r in p.reasons) or p.error  # the judge's replies are kept
        if p.outcome is None:
            assert p.error
        else:
            assert all(1 <= x <= 10 for pair in p.scores for x in pair)  # type: ignore[union-attr]
    if s.n:
        assert s.winning_score == pytest.approx((s.wins - s.losses) / s.n + 1)
    # the served base has no local weights to score; the adapter model's held-out loss is the trainer's eval loss
    assert set(result.heldout_loss) == {"tuned"}
    assert result.heldout_loss["tuned"] == pytest.approx(adapter_run["result"].eval_loss, abs=1e-3)
    assert json.loads((out / "eval.json").read_text())["heldout_loss"]["tuned"] == result.heldout_loss["tuned"]
