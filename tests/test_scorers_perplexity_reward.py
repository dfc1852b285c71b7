"""Perplexity under the bundled SmolLM2 equals exp(mean NLL) computed here with torch; RewardScorer reads a
sequence-classification model's score, batched equal to one row at a time, from a tiny randomly initialised reward
model built here (nothing is downloaded)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from thresher.errors import ConfigError
from thresher.scorers import Perplexity, RewardScorer

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]

ROWS = [
    {"id": "a", "instruction": "Name a colour.", "input": "", "output": "Blue is a calm colour."},
    {"id": "b", "instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5, so the sum is five."},
    {"id": "c", "instruction": "Say hello.", "input": "", "output": "Hello! It is good to meet you today, friend."},
    {"id": "d", "instruction": "Describe rain.", "input": "", "output": "Water falls from clouds."},
    {"id": "e", "instruction": "Describe snow.", "input": "", "output": "Cold white flakes drift down slowly " * 3},
]


def test_perplexity_equals_exp_mean_nll(smol_hf_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = Perplexity(backend={"kind": "transformers", "model": str(smol_hf_dir)}, max_length=12, batch_size=2)
    result = step.apply([*ROWS, {"id": "none", "instruction": "x", "input": "", "output": None}])
    assert result.failed.column("error").to_pylist() == ["row id='none': field 'output' is null: no text to score"]
    tok = AutoTokenizer.from_pretrained(smol_hf_dir)
    model = AutoModelForCausalLM.from_pretrained(smol_hf_dir).eval()
    for row, got in zip(ROWS, result.output.to_pylist(), strict=True):
        ids = tok(row["output"], add_special_tokens=False)["input_ids"][:12]  # no BOS: the first token is context
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        nll = -sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids))) / (len(ids) - 1)
        assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4), row["id"]
    named = Perplexity(column="instruction", output_column="instruction_ppl")
    assert named.reads() == ("instruction",) and named.writes() == ("instruction_ppl",)


@pytest.fixture(scope="module")
def reward_dir(smol_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama reward model with random weights and SmolLM2's tokenizer (and chat template)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    d = tmp_path_factory.mktemp("reward")
    tok = AutoTokenizer.from_pretrained(smol_hf_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512, num_labels=1, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("fmt", ["auto", "pair"])
def test_reward_batched_equals_one_row_at_a_time(reward_dir: Path, fmt: str) -> None:
    rows: list[dict[str, Any]] = [*ROWS, {"id": "none", "instruction": "x", "input": "", "output": None}]
    batched = RewardScorer(model=str(reward_dir), format=fmt, batch_size=4).apply(rows)
    alone = RewardScorer(model=str(reward_dir), format=fmt, batch_size=1).apply(rows)
    assert batched.failed.column("error").to_pylist() == ["row id='none': field 'output' is null: no response to score"]
    a, b = batched.output.column("reward").to_pylist(), alone.output.column("reward").to_pylist()
    assert len(a) == len(ROWS) and all(isinstance(v, float) for v in a)
    assert a == pytest.approx(b, abs=1e-5)
    assert len(set(a)) == len(a)  # the rows get their own scores, not a padded neighbour's


def test_reward_scores_the_rendered_chat_by_default(reward_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from thresher.data.messages import record_messages

    got = RewardScorer(model=str(reward_dir)).apply(ROWS[:2]).output.column("reward").to_pylist()
    tok = AutoTokenizer.from_pretrained(reward_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    for row, value in zip(ROWS[:2], got, strict=True):
        ids = tok(tok.apply_chat_template(record_messages(row), tokenize=False), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            expected = float(model(torch.tensor([ids])).logits[0, 0])
        assert value == pytest.approx(expected, abs=1e-5)


def test_reward_parameters_are_checked(reward_dir: Path) -> None:
    with pytest.raises(ConfigError, match="format"):
        RewardScorer(model=str(reward_dir), format="triple").check()
    step = RewardScorer(model=str(reward_dir), label=3)
    with pytest.raises(ConfigError, match="label 3"):
        step.load()
    assert RewardScorer(model=str(reward_dir), batch_size=2).fingerprint() == RewardScorer(model=str(reward_dir)).fingerprint()
    assert RewardScorer(model=str(reward_dir), format="pair").fingerprint() != RewardScorer(model=str(reward_dir)).fingerprint()
