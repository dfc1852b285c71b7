"""Batched decoding of the embedded llama.cpp model (`LlamaCpp(n_parallel=8)`, `llamacpp_batch.BatchedDecoder`)
against llama-cpp-python's one-request-at-a-time path, on real instructions: same text at temperature 0, the same
log-probabilities, and per-sequence stops, max tokens, seeds and `n` while sequences come and go."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from thresher.llms import LlamaCpp
from thresher.llms.llamacpp_batch import BatchedDecoder, SeqRequest
from thresher.llms.local import GenItem

pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("isolated_cache")]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conversations(shared_data: Path) -> list[list[dict[str, str]]]:
    """64 real instructions: 56 from the Vicuna test set, 8 of the Chinese seed tasks."""
    lines = (shared_data / "cherry-llm" / "vicuna_test_set.jsonl").read_text().splitlines()
    en = [json.loads(x)["text"] for x in lines[:56]]
    zh_rows = (REPO / "generators" / "seeds" / "self_instruct.zh.jsonl").read_text().splitlines()
    zh = [json.loads(x)["instruction"] for x in zh_rows[:8]]
    return [[{"role": "user", "content": q}] for q in en + zh]


@pytest.fixture(scope="module")
def batched() -> LlamaCpp:
    b = LlamaCpp(n_parallel=8, cache=False)
    b.load()  # tests reach model_ directly: loaded whichever test runs first
    yield b
    b.close()


@pytest.fixture(scope="module")
def one_at_a_time() -> LlamaCpp:
    b = LlamaCpp(n_parallel=1, cache=False)
    yield b
    b.close()


def _requests(backend: LlamaCpp, convs: list[list[dict[str, str]]], top: int | None = None, **sampling: object) -> list[SeqRequest]:
    backend._batched()
    reqs = [backend._seq_request(GenItem(c, None, dict(sampling), None), top) for c in convs]
    assert all(r is not None for r in reqs)
    return reqs  # type: ignore[return-value]


def test_same_text_and_logprobs_at_temperature_0(
    conversations: list[list[dict[str, str]]], batched: LlamaCpp, one_at_a_time: LlamaCpp
) -> None:
    ref = one_at_a_time.chat(conversations, max_tokens=16, temperature=0)
    out = batched.chat(conversations, max_tokens=16, temperature=0)
    assert all(r.ok for r in ref) and all(o.ok for o in out)
    same = sum(r.texts == o.texts for r, o in zip(ref, out, strict=True))
    assert same >= 0.95 * len(conversations), f"only {same}/{len(conversations)} texts agree"
    # the log-probability of every chosen token: 64 sequences 8 at a time against the same 64 alone
    alone = BatchedDecoder(batched.model_, n_parallel=1, n_ctx=2048)
    try:
        reqs = _requests(batched, conversations, top=0, max_tokens=16, temperature=0)
        solo = alone.generate(reqs)
    finally:
        alone.close()
    together = batched._batched().generate(reqs)  # type: ignore[union-attr]
    worst = 0.0
    for a, b in zip(solo, together, strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception)
        assert a.logprobs is not None and b.logprobs is not None
        for x, y in zip(a.logprobs, b.logprobs, strict=False):  # up to where the chosen tokens part, if they do
            if x.token != y.token:
                break
            worst = max(worst, abs(x.logprob - y.logprob))
    assert worst <= 1e-3, f"chosen-token log-probabilities differ by up to {worst}"
    print(f"\n{same}/{len(conversations)} texts identical; largest chosen-token logprob difference {worst:.2e}")


def test_each_sequence_keeps_its_own_max_tokens_stop_and_seed(
    conversations: list[list[dict[str, str]]], batched: LlamaCpp, one_at_a_time: LlamaCpp
) -> None:
    convs = conversations[:6]
    free = batched.chat(convs, max_tokens=24, temperature=0)
    # in one batch: max_tokens 1..6, then a stop string cut from each free answer
    reqs = _requests(batched, convs, temperature=0, max_tokens=24)
    for i, r in enumerate(reqs[:3]):
        r.max_tokens = i + 1
    stops: list[str] = []
    for r, f in zip(reqs[3:], free[3:], strict=True):
        words = (f.text or "").split()
        stop = words[len(words) // 2] if len(words) > 2 else ""
        stops.append(stop)
        r.stop = [*r.stop, stop]
    res = batched._batched().generate(reqs)  # type: ignore[union-attr]
    for i, r in enumerate(res[:3]):
        assert not isinstance(r, Exception)
        assert r.completion_tokens == i + 1 and r.finish_reason == "length"
    for r, f, stop in zip(res[3:], free[3:], stops, strict=True):
        assert not isinstance(r, Exception)
        assert stop and stop not in r.text and r.finish_reason == "stop"
        assert (f.text or "").startswith(r.text) and (f.text or "")[len(r.text) :].startswith(stop)
    # n samples at temperature 1 decoded together: sample s has seed + s, and draws what it draws alone
    many = batched.chat(convs[:2], n=3, seed=11, temperature=1.0, max_tokens=12)
    alone = [[batched.chat([c], seed=11 + s, temperature=1.0, max_tokens=12)[0].text for s in range(3)] for c in convs[:2]]
    assert [m.texts for m in many] == alone
    assert len(set(many[0].texts)) > 1  # three different samples, not one repeated


def test_waiting_requests_join_as_slots_free(conversations: list[list[dict[str, str]]], batched: LlamaCpp) -> None:
    # 4 slots, 12 requests of very different lengths: short ones leave, waiting ones take their slots
    dec = BatchedDecoder(batched.model_, n_parallel=4, n_ctx=1024)
    try:
        reqs = _requests(batched, conversations[10:22], temperature=0)
        for i, r in enumerate(reqs):
            r.max_tokens = 2 + (i * 7) % 23
        res = dec.generate(reqs)
        steps = dec.steps
        alone = [dec.generate([r])[0] for r in reqs[:4]]
    finally:
        dec.close()
    assert all(not isinstance(r, Exception) for r in res)
    assert dec.peak_live == 4
    tokens = sum(r.completion_tokens for r in res)  # type: ignore[union-attr]
    assert steps < 0.6 * tokens  # far fewer decode calls than tokens: the steps were shared
    assert [a.text for a in alone] == [r.text for r in res[:4]]  # type: ignore[union-attr]


def test_sequences_left_on_scattered_slots_move_down_with_the_same_tokens(
    conversations: list[list[dict[str, str]]], batched: LlamaCpp
) -> None:
    # 6 slots; the sequences on slots 0, 2 and 3 stop after 2 tokens, nothing waits: the three left (1, 4, 5) are
    # moved down to 0-2, so each step is one piece for llama.cpp, not one per run of slots. Their tokens and
    # log-probabilities are those of each decoded alone, bit for bit
    reqs = _requests(batched, conversations[30:36], top=0, temperature=0)
    for i, r in enumerate(reqs):
        r.max_tokens = 24 if i in (1, 4, 5) else 2
    dec = BatchedDecoder(batched.model_, n_parallel=6, n_ctx=1024)
    solo = BatchedDecoder(batched.model_, n_parallel=1, n_ctx=1024)
    try:
        res = dec.generate(reqs)
        alone = [solo.generate([r])[0] for r in reqs]
    finally:
        dec.close()
        solo.close()
    assert dec.moves >= 2
    for a, r in zip(alone, res, strict=True):
        assert not isinstance(a, Exception) and not isinstance(r, Exception)
        assert a.text == r.text and a.completion_tokens == r.completion_tokens
        assert [t.logprob for t in a.logprobs or []] == [t.logprob for t in r.logprobs or []]


def test_threads_calling_one_backend_share_its_slots(conversations: list[list[dict[str, str]]]) -> None:
    b = LlamaCpp(n_parallel=8, cache=False)
    try:
        outs: dict[int, list] = {}

        def ask(k: int) -> None:
            outs[k] = b.chat(conversations[20 + 4 * k : 24 + 4 * k], max_tokens=12, temperature=0)

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(o.ok for k in outs for o in outs[k])
        assert b._decoder is not None and b._decoder.peak_live > 4  # both calls' requests were decoded together
    finally:
        b.close()


def test_prompts_sharing_a_beginning_reuse_it_with_the_same_logits(shared_data: Path, batched: LlamaCpp) -> None:
    # a classifier's long instructions before each of 12 real queries: each query is read from where it parts from
    # what a slot holds, its own or (copied) another's; the logits match reading every prompt whole, bit for bit,
    # also read in chunks of 16 (chunk boundaries fall everywhere, some prompts end one token past one)
    rows = json.loads((shared_data / "realign" / "task_classifier_test_dataset.json").read_text())[:12]
    kinds = "; ".join(f"kind {i}: requests of the {i}th sort, described in a sentence" for i in range(24))
    convs = [[{"role": "system", "content": f"Name the kind of the request. Kinds: {kinds}."},
              {"role": "user", "content": r["instruction"][:300]}] for r in rows]  # fmt: skip
    reqs = _requests(batched, convs, top=0, max_tokens=6, temperature=0)
    runs = {}
    for name, reuse, n_batch in (("whole", False, 512), ("reused", True, 512), ("chunks of 16", True, 16)):
        dec = BatchedDecoder(batched.model_, n_parallel=4, n_ctx=1024, n_batch=n_batch, reuse_prefix=reuse)
        try:
            runs[name] = (dec.generate(reqs), dec.reused_tokens)
        finally:
            dec.close()
    prompt_tokens = sum(len(r.tokens) for r in reqs)
    whole, reused = runs["whole"], runs["reused"]
    assert whole[1] == 0 and reused[1] > 0.6 * prompt_tokens  # most of each prompt was not read again
    for res, _ in runs.values():
        assert all(not isinstance(r, Exception) for r in res)
        assert [r.text for r in res] == [r.text for r in whole[0]]  # type: ignore[union-attr]
        got = [[t.logprob for t in r.logprobs] for r in res]  # type: ignore[union-attr]
        assert got == [[t.logprob for t in r.logprobs] for r in whole[0]]  # type: ignore[union-attr]


def test_bad_requests_fail_alone(batched: LlamaCpp) -> None:
    dec = batched._batched()
    assert dec is not None
    long = _requests(batched, [[{"role": "user", "content": "word " * 3000}]], temperature=0, max_tokens=4)[0]
    ok = _requests(batched, [[{"role": "user", "content": "Say hi."}]], temperature=0, max_tokens=4)[0]
    res = dec.generate([long, ok, SeqRequest([], 4)])
    assert isinstance(res[0], ValueError) and "exceed context window" in str(res[0])
    assert not isinstance(res[1], Exception) and res[1].text
    assert isinstance(res[2], ValueError)
