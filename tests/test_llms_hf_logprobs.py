"""Log-probabilities that IFD and DEITA can trust: rendered text tokenized as the trainer tokenizes it (one BOS, even
with a template that writes its own), the answer's scored tokens equal to the trainer's supervised tokens in both
IFD passes, the same answer budget in both, and next-token scores of whole multi-token candidates, cached."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from thresher.llms import Transformers
from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template, row_to_messages

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]

# SmolLM2's own turns without its default system message, with a BOS written first as Llama-3's template does
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BOS_TEMPLATE = "{{ bos_token }}" + CHATML

ROWS = [
    {
        "id": "plain",
        "instruction": "Name a colour.",
        "input": "",
        "output": "Blue is a calm colour.",
        "system": None,
        "history": [],
    },
    {
        "id": "chat",
        "instruction": "Translate to French.",
        "input": "good morning",
        "output": "Bonjour !",
        "system": "Be brief.",
        "history": [["Hi", "Hello! How can I help?"]],
    },
    {
        "id": "leading-newline",
        "instruction": "Write a list.",
        "input": "",
        "output": "\n- one\n- two",
        "system": "",
        "history": [],
    },
]


@pytest.fixture(scope="module")
def bos_model_dir(smol_hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with a Llama-3-style tokenizer: its own BOS (<|endoftext|>), added by the tokenizer to every text,
    and a chat template that writes {{ bos_token }} too. Tokenizing the rendered text with special tokens doubles
    the BOS."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bos-model")
    tok = AutoTokenizer.from_pretrained(smol_hf_dir)
    tok.bos_token = "<|endoftext|>"
    tok.chat_template = BOS_TEMPLATE
    tok.save_pretrained(d)
    # the weights by link; everything small is a copy, so nothing written here reaches the shared conversion
    (d / "model.safetensors").symlink_to(smol_hf_dir / "model.safetensors")
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(smol_hf_dir / name, d / name)
    # the tokenizer adds the BOS to every text it encodes with special tokens (Llama-3's post-processor)
    spec = json.loads((d / "tokenizer.json").read_text())
    bos = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|endoftext|>": {"id": "<|endoftext|>", "ids": [tok.bos_token_id], "tokens": ["<|endoftext|>"]}
        },
    }
    (d / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["add_bos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def bos_lm(bos_model_dir: Path) -> Transformers:
    lm = Transformers(model=bos_model_dir, batch_size=4, cache=False).load()
    tok = lm.tokenizer_
    assert tok.bos_token == "<|endoftext|>" and tok("x")["input_ids"][0] == tok.bos_token_id  # adds a BOS
    return lm


@pytest.fixture(scope="module")
def lm(smol_hf_dir: Path) -> Transformers:
    return Transformers(model=smol_hf_dir, batch_size=4, cache=False).load()


def _trainer_reference(lm: Transformers, rows: list[dict[str, Any]]) -> list[tuple[list[int], list[float]]]:
    """What the trainer supervises in each row's last turn, and the model's log-probability of each of those
    tokens in the trainer's input ids (one row at a time, full logits)."""
    import torch

    tok = lm.tokenizer_
    examples, _ = render_rows(
        rows,
        tok,
        chat_template=resolve_chat_template(tok, None),
        max_seq_len=4096,
        eot_ids=end_of_turn_ids(tok, None),
        train_on_history=False,
    )
    out = []
    for ex in examples:
        assert ex.input_ids[:2] != [tok.bos_token_id] * 2
        with torch.no_grad():
            lp = torch.log_softmax(lm.model_(torch.tensor([ex.input_ids])).logits[0].float(), -1)
        positions = [t for t, s in enumerate(ex.supervised) if s]
        out.append(([ex.input_ids[t] for t in positions], [float(lp[t - 1, ex.input_ids[t]]) for t in positions]))
    return out


def _close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0) < tol


def test_a_template_that_writes_bos_is_not_given_a_second_one(bos_lm: Transformers) -> None:
    """The rendered prompt already starts with the BOS the template wrote; logprobs must not add another."""
    tok = bos_lm.tokenizer_
    ref = _trainer_reference(bos_lm, ROWS[:2])
    for row, (ids, values) in zip(ROWS[:2], ref, strict=True):
        messages = row_to_messages(row)
        prompt = bos_lm.render(messages[:-1])
        assert prompt.startswith("<|endoftext|><|im_start|>")
        got = bos_lm.logprobs([prompt], [row["output"] + "<|im_end|>"])[0]
        assert got.token_ids == ids
        assert _close(got.logprobs, values), (got.logprobs, values)
    assert tok.bos_token_id not in ref[0][0]


@pytest.mark.parametrize("which", ["smollm2", "bos_template"])
def test_ifd_passes_score_exactly_the_tokens_the_trainer_supervises(
    which: str, lm: Transformers, bos_lm: Transformers
) -> None:
    model = lm if which == "smollm2" else bos_lm
    tok = model.tokenizer_
    ref = _trainer_reference(model, ROWS)
    texts = model.answer_texts([row_to_messages(r) for r in ROWS])
    assert texts[0].header == ("<|endoftext|>" if which == "bos_template" else "") + "<|im_start|>assistant\n"
    assert texts[0].answer == "Blue is a calm colour.<|im_end|>"
    assert texts[1].prompt.endswith(
        "<|im_start|>user\nTranslate to French.\ngood morning<|im_end|>\n<|im_start|>assistant\n"
    )
    pairs = model.answer_logprobs([row_to_messages(r) for r in ROWS])
    import torch

    for t, pair, (ids, values) in zip(texts, pairs, ref, strict=True):
        assert pair.conditioned.token_ids == ids and pair.unconditioned.token_ids == ids
        assert _close(pair.conditioned.logprobs, values)
        # the unconditioned pass: the response header alone, then the answer, through the model in one piece
        full = tok(t.header + t.answer, add_special_tokens=False)["input_ids"]
        if which == "bos_template":
            assert full[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
        with torch.no_grad():
            lp = torch.log_softmax(model.model_(torch.tensor([full])).logits[0].float(), -1)
        n = len(ids)
        alone = [float(lp[len(full) - n - 1 + j, full[len(full) - n + j]]) for j in range(n)]
        assert full[len(full) - n :] == ids
        assert _close(pair.unconditioned.logprobs, alone)
        assert pair.ifd == pytest.approx(pair.conditioned.mean_nll / pair.unconditioned.mean_nll)


def test_ifd_passes_share_one_answer_budget(lm: Transformers) -> None:
    messages = [row_to_messages(r) for r in ROWS]
    cut = lm.answer_logprobs(messages, max_answer_tokens=3)
    assert all(len(p.conditioned.logprobs) == len(p.unconditioned.logprobs) == 3 for p in cut)
    assert all(p.conditioned.truncated and p.unconditioned.truncated for p in cut)
    # a max_length that cuts the conditioned pass cuts the unconditioned one to the same answer tokens
    short = Transformers(model=lm.model, batch_size=4, cache=False, max_length=60)
    short.model_, short.tokenizer_, short.device_ = lm.model_, lm.tokenizer_, lm.device_
    long_row = {**ROWS[0], "output": " ".join(["word"] * 80)}
    (pair,) = short.answer_logprobs([row_to_messages(long_row)])
    assert pair.conditioned.truncated and pair.unconditioned.truncated
    assert pair.conditioned.token_ids == pair.unconditioned.token_ids
    n_prompt = len(
        lm.tokenizer_(lm.answer_texts([row_to_messages(long_row)])[0].prompt, add_special_tokens=False)["input_ids"]
    )
    assert len(pair.conditioned.token_ids) == 60 - n_prompt


def _one_at_a_time(lm: Transformers, prompt: str, candidate: str) -> float:
    """log p(candidate | prompt): the joined text through the model alone, summed over the candidate's tokens."""
    import torch

    tok = lm.tokenizer_
    pre = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + candidate, add_special_tokens=False)["input_ids"]
    assert full[: len(pre)] == pre and len(full) > len(pre)
    with torch.no_grad():
        lp = torch.log_softmax(lm.model_(torch.tensor([full])).logits[0].float(), -1)
    return sum(float(lp[t - 1, full[t]]) for t in range(len(pre), len(full)))


PROMPTS = [
    "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nRate this answer from 1 to 6.<|im_end|>\n<|im_start|>assistant\nScore:",
]
CANDIDATES = ["Blue", " purple", " aquamarine-turquoise", "3", " 3", "Antidisestablishmentarianism"]


def test_next_token_logprobs_score_whole_multi_token_candidates(lm: Transformers) -> None:
    tok = lm.tokenizer_
    assert any(len(tok(c, add_special_tokens=False)["input_ids"]) > 2 for c in CANDIDATES)
    scores = lm.next_token_logprobs(PROMPTS, CANDIDATES)
    for prompt, got in zip(PROMPTS, scores, strict=True):
        assert list(got) == CANDIDATES
        for c in CANDIDATES:
            assert got[c] == pytest.approx(_one_at_a_time(lm, prompt, c), abs=1e-4), c
    # the same as the continuation's total log-probability
    assert scores[0][" purple"] == pytest.approx(lm.logprobs([PROMPTS[0]], [" purple"])[0].total, abs=1e-4)


def test_next_token_logprobs_are_cached(smol_hf_dir: Path) -> None:
    first = Transformers(model=smol_hf_dir, batch_size=4)
    a = first.next_token_logprobs(PROMPTS, CANDIDATES)
    assert first.usage.requests > 0 and first.usage.cache_misses == len(PROMPTS) * len(CANDIDATES)
    again = Transformers(model=smol_hf_dir, batch_size=4)
    b = again.next_token_logprobs(PROMPTS, CANDIDATES)
    assert again.usage.requests == 0 and again.usage.cache_hits == len(PROMPTS) * len(CANDIDATES)
    assert b == a
