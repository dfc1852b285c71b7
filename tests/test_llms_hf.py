"""Transformers backend on the bundled SmolLM2 (GGUF converted once to safetensors): log-probabilities batched vs
one at a time vs a plain full-logits computation, truncation, next-token scores, the cache, generation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from thresher.llms import Transformers, hf_dir_for_gguf, smollm2_gguf

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]

PREFIXES = [
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is two plus two? Answer briefly please.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>assistant\n",
    "Once upon a time",
]
CONTS = ["Blue.", "Two plus two is four.", "Blue.", " there was a small village by the sea."]


@pytest.fixture(scope="module")
def lm(smol_hf_dir: Path) -> Transformers:
    return Transformers(model=smol_hf_dir, batch_size=4, cache=False).load()


def test_gguf_conversion_is_made_once(smol_hf_dir: Path) -> None:
    assert (smol_hf_dir / "config.json").is_file() and (smol_hf_dir / "model.safetensors").is_file()
    t0 = time.perf_counter()
    assert hf_dir_for_gguf(smollm2_gguf()) == smol_hf_dir
    assert time.perf_counter() - t0 < 2.0


def test_gguf_conversion_keeps_the_files_special_tokens(smol_hf_dir: Path) -> None:
    """SmolLM2's turns end with <|im_end|> (id 2). transformers up to 5.17 converted the GGUF tokenizer with eos set
    to the file's bos (<|im_start|>) and no pad; the conversion takes all three from the file's ids instead."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer, config = AutoTokenizer.from_pretrained(smol_hf_dir), AutoConfig.from_pretrained(smol_hf_dir)
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == config.bos_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == config.eos_token_id
    assert tokenizer.pad_token_id == config.pad_token_id


def test_logprobs_batched_equal_one_at_a_time_and_full_logits(lm: Transformers) -> None:
    import torch

    batched = lm.logprobs(PREFIXES, CONTS)
    single = Transformers(model=lm.model, batch_size=1, cache=False)
    single.model_, single.tokenizer_, single.device_, single._cache = lm.model_, lm.tokenizer_, lm.device_, None
    for i, (p, c) in enumerate(zip(PREFIXES, CONTS, strict=True)):
        alone = single.logprobs([p], [c])[0]
        assert alone.token_ids == batched[i].token_ids
        assert max(abs(a - b) for a, b in zip(alone.logprobs, batched[i].logprobs, strict=True)) < 1e-3
        # the straightforward computation: whole sequence through the model, log-softmax of every position
        tok = lm.tokenizer_
        pre = tok(p)["input_ids"]
        cont = tok(c, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.model_(torch.tensor([pre + cont])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        ref = [float(lp[len(pre) - 1 + j, t]) for j, t in enumerate(cont)]
        assert max(abs(a - b) for a, b in zip(ref, batched[i].logprobs, strict=True)) < 1e-3
    assert batched[0].tokens and all(v <= 0 for v in batched[0].logprobs)
    # the same continuation is likelier after its instruction than after the bare response header (IFD's premise)
    assert batched[0].mean_nll < batched[2].mean_nll


def test_truncation_and_next_token(lm: Transformers) -> None:
    cut = lm.logprobs([PREFIXES[3]], [CONTS[3]], max_continuation_tokens=3)[0]
    full = lm.logprobs([PREFIXES[3]], [CONTS[3]])[0]
    assert cut.truncated and len(cut.logprobs) == 3 and cut.logprobs == pytest.approx(full.logprobs[:3], abs=1e-4)
    prompt = "<|im_start|>user\nRate this from 1 to 6.<|im_end|>\n<|im_start|>assistant\n"
    scores = lm.next_token_logprobs([prompt], [str(d) for d in range(1, 7)])[0]
    assert set(scores) == {"1", "2", "3", "4", "5", "6"} and all(v < 0 for v in scores.values())
    one = lm.logprobs([prompt], ["3"])[0]
    if len(one.token_ids) == 1:
        assert scores["3"] == pytest.approx(one.logprobs[0], abs=1e-4)


def test_logprobs_cache(smol_hf_dir: Path) -> None:
    a = Transformers(model=smol_hf_dir, batch_size=4)
    first = a.logprobs(PREFIXES[:2], CONTS[:2])
    b = Transformers(model=smol_hf_dir, batch_size=4)
    second = b.logprobs(PREFIXES[:2], CONTS[:2])
    assert b.usage.cache_hits == 2 and b.usage.requests == 0
    assert [s.logprobs for s in second] == [f.logprobs for f in first]


def test_generation_from_the_gguf_path() -> None:
    lm = Transformers(batch_size=2, cache=False)  # default model: the bundled GGUF, through its converted copy
    assert "<|im_start|>assistant" in lm.render([{"role": "user", "content": "Hi"}])
    out = lm.chat(
        [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Say yes."}]],
        max_tokens=4,
        temperature=0,
    )
    assert all(o.ok and o.text for o in out), [o.error for o in out]
    assert out[0].finish_reasons[0] in ("stop", "length") and out[0].completion_tokens <= 4
