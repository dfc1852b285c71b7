"""Log-probabilities of given text, tokenized as the trainer tokenizes it: the part every scoring backend shares.

`TokenScorer` is a mixin for backends that hold the model's tokenizer: the local `Transformers` model (it runs the
forward passes) and `OpenAICompatible` pointed at a vLLM server (it asks for `prompt_logprobs`). It owns everything
but the model call: tokenization of (prefix, continuation) pairs as `thresher.trainer.chat.encode_rendered` does
(the joined text without special tokens, the tokenizer's BOS first only where it adds one and the text lacks it;
the continuation's tokens are those that start inside it), token budgets, the request cache, whole-candidate
next-token scores, and IFD's two passes over an answer. A backend implements `_score_picks(seqs, picks, desc)`:
for each token sequence, log p(target | tokens up to position) of each (position, target) pick; and
`_scoring_tokenizer()` (the loaded tokenizer), and may name extra end-of-turn ids (`_generation_eos`).

IFD's passes (`score_answers`): the conditioned pass scores the answer after its whole prompt, the unconditioned
pass after a shorter prefix (the template's response header for Cherry's IFD, nothing for Superfiltering), both cut
to one answer budget: the tokens that fit in `max_length` after the conditioned prompt (Cherry truncates prompt +
answer to `max_length`, so the answer keeps what is left), and at most `max_answer_tokens`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from thresher.errors import BackendError, ConfigError
from thresher.llms.base import Conversation, TokenLogprobs, Usage
from thresher.llms.cache import request_key

if TYPE_CHECKING:
    from thresher.llms.cache import RequestCache
    from thresher.trainer.chat import AnswerTexts

# Part of every log-probability cache key: bumping it makes answers scored by an older tokenization be scored anew.
# 2: the trainer's tokenization (no second BOS before a template's own); next-token scores of whole candidates.
LOGPROBS_VERSION = 2


@dataclass
class AnswerLogprobs:
    """IFD's two passes over one answer: given its prompt, and given a shorter prefix (the response header alone,
    or nothing), over the same answer budget. `error` says why a pair could not be scored (then both are empty)."""

    conditioned: TokenLogprobs
    unconditioned: TokenLogprobs
    error: str | None = None

    @property
    def ifd(self) -> float:
        """Instruction-following difficulty: the conditioned mean NLL over the unconditioned one (nan when empty)."""
        alone = self.unconditioned.mean_nll
        return self.conditioned.mean_nll / alone if alone else float("nan")


class TokenScorer:
    """Mixin: `logprobs`, `next_token_logprobs`, `answer_texts`, `score_answers`, `answer_logprobs` over a
    backend's `_score_picks`; see the module docstring."""

    max_length: int
    progress: bool
    usage: Usage
    _cache: RequestCache | None

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def _scoring_tokenizer(self) -> Any:
        """The loaded tokenizer (loading the backend first if needed)."""
        raise NotImplementedError

    def _generation_eos(self) -> list[int]:
        """End-of-turn ids beyond the tokenizer's eos (a model's generation config names them)."""
        return []

    def _score_picks(
        self, seqs: list[list[int]], picks: list[list[tuple[int, int]]], desc: str
    ) -> list[list[float] | str]:
        """For each sequence, log p(target | its tokens up to `position`) of each (position, target) pick, or a
        message saying why that sequence could not be scored."""
        raise NotImplementedError

    # ---- log-probabilities ----------------------------------------------------------------------

    def _pair_ids(
        self, prefixes: Sequence[str], continuations: Sequence[str]
    ) -> list[tuple[list[int], list[int], bool]]:
        """(prefix ids, continuation ids) of each pair, tokenized as the trainer tokenizes a rendered conversation.

        prefix + continuation is tokenized as one text without special tokens (a rendered chat template writes its
        own), with the tokenizer's BOS first only when it adds one and the text lacks it
        (`thresher.trainer.chat.encode_rendered`); the continuation's tokens are those that start inside it, the
        trainer's rule for supervised tokens. The flag says a token crosses the boundary (it starts in the prefix and
        ends in the continuation, whose first characters it takes). A slow tokenizer (no offsets) tokenizes the two
        apart.
        """
        from thresher.trainer.chat import adds_bos, encode_rendered

        tok = self._scoring_tokenizer()
        if getattr(tok, "is_fast", False):
            out = []
            encoded = encode_rendered(tok, [p + c for p, c in zip(prefixes, continuations, strict=True)])
            for (ids, offsets), p in zip(encoded, prefixes, strict=True):
                k = next((t for t, (start, _) in enumerate(offsets) if start >= len(p)), len(ids))
                out.append((ids[:k], ids[k:], k > 0 and offsets[k - 1][1] > len(p)))
            return out
        bos, prepend = tok.bos_token_id, adds_bos(tok)
        pairs: list[tuple[list[int], list[int], bool]] = []
        for p, c in zip(prefixes, continuations, strict=True):
            pre = list(tok(p, add_special_tokens=False)["input_ids"])
            if prepend and pre[:1] != [bos]:
                pre = [bos, *pre]
            pairs.append((pre, list(tok(c, add_special_tokens=False)["input_ids"]), False))
        return pairs

    def logprobs(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        *,
        max_continuation_tokens: int | Sequence[int | None] | None = None,
    ) -> list[TokenLogprobs]:
        """Per-token log-probabilities (natural log, float32 precision) of each continuation given its prefix.

        Tokenization is the trainer's (see `_pair_ids`): prefix + continuation as one text, no special tokens but
        the tokenizer's BOS where it adds one and the text does not start with it, so a rendered chat template that
        writes its own BOS is not given a second one; the continuation's tokens are those starting inside it.
        `max_continuation_tokens` (one budget, or one per pair) cuts continuations to that many tokens; pairs
        longer than `max_length` lose continuation tokens from the end; either sets `truncated=True`. An empty
        prefix means unconditioned: the first continuation token is predicted from the BOS when the tokenizer
        adds one, otherwise it gets no log-probability. For IFD, `answer_logprobs` renders both passes.
        """
        if len(prefixes) != len(continuations):
            raise ConfigError(f"logprobs: {len(prefixes)} prefixes but {len(continuations)} continuations")
        if max_continuation_tokens is None or isinstance(max_continuation_tokens, int):
            budgets: list[int | None] = [max_continuation_tokens] * len(prefixes)
        else:
            budgets = list(max_continuation_tokens)
            if len(budgets) != len(prefixes):
                raise ConfigError(f"logprobs: {len(prefixes)} pairs but {len(budgets)} max_continuation_tokens")
        tok = self._scoring_tokenizer()
        ident = self.identity()
        keys = [
            request_key("logprobs", ident, p, c, b, self.max_length, LOGPROBS_VERSION)
            for p, c, b in zip(prefixes, continuations, budgets, strict=True)
        ]
        cache = self._cache
        found = cache.get_many(keys) if cache is not None else {}
        out: list[TokenLogprobs | None] = [None] * len(keys)
        for i, k in enumerate(keys):
            if k in found:
                out[i] = _unpack(found[k])
        self.usage.cache_hits += sum(o is not None for o in out)
        todo = [i for i, o in enumerate(out) if o is None]
        self.usage.cache_misses += len(todo)
        if todo:
            seqs, picks, meta = [], [], []
            encoded = self._pair_ids([prefixes[i] for i in todo], [continuations[i] for i in todo])
            for i, (pre, cont, _) in zip(todo, encoded, strict=True):
                truncated = False
                budget = budgets[i]
                if budget is not None and len(cont) > budget:
                    cont, truncated = cont[:budget], True
                room = self.max_length - len(pre)
                if room < len(cont):
                    if room < 1:
                        raise BackendError(
                            f"logprobs: pair {i}: the prefix alone has {len(pre)} tokens, max_length is {self.max_length}"
                        )
                    cont, truncated = cont[:room], True
                # position t predicts token t+1; with no prefix token the first continuation token has no score
                pick = [(len(pre) + j - 1, t) for j, t in enumerate(cont) if len(pre) + j > 0]
                seqs.append(pre + cont)
                picks.append(pick)
                meta.append((i, truncated))
            values = self._score_picks(seqs, picks, "logprobs")
            for (i, truncated), pick, vals in zip(meta, picks, values, strict=True):
                if isinstance(vals, str):  # a served model that failed this pair (never cached)
                    out[i] = TokenLogprobs([t for _, t in pick], [], truncated=truncated, error=vals)
                else:
                    out[i] = TokenLogprobs([t for _, t in pick], vals, truncated=truncated)
            if cache is not None:
                for i in todo:
                    o = out[i]
                    assert o is not None
                    if o.error is None:
                        cache.put(keys[i], _pack(o), kind="logprobs", model=str(ident["model"]))
                cache.flush()
        convert = tok.convert_ids_to_tokens
        result = []
        for o in out:
            assert o is not None
            if not o.tokens and o.error is None:
                o.tokens = list(convert(o.token_ids))
            result.append(o)
        return result

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[dict[str, float]]:
        """For each prompt (already rendered text), the log-probability that the text goes on with each candidate.

        A candidate is scored whole: the sum of its tokens' log-probabilities, each given the prompt and the
        candidate's tokens before it (`logprobs(prompt, candidate).total`); for a one-token candidate, such as the
        digits "1".."6" of DEITA's expected scores, that is the next-token log-probability.

        Tokenization is `logprobs`'s: prompt + candidate as one text (no special tokens added but the tokenizer's
        BOS where it adds one), the candidate's tokens being those that start inside it. A candidate is appended as
        written, nothing inserted: " 3" carries its leading space (GPT-2-style vocabularies have one token for it),
        "3" does not, and which one a model expects depends on how the prompt ends (after "Score:" usually " 3",
        after a chat template's "assistant\\n" usually "3"). A candidate with no token of its own, or whose first
        characters the tokenizer merges into the prompt's last token (a prompt ending in a space before a word),
        is a ConfigError: its score would leave part of it out.

        Batched: (prompt, candidate) pairs that need the same tokens through the model share one forward pass (all
        one-token candidates of a prompt take one), sequences sorted by length. Each pair's answer is stored in the
        request cache, so a second call with the same prompts and candidates runs nothing.
        """
        self._scoring_tokenizer()
        ident = self.identity()
        pairs = [(p, c) for p in prompts for c in dict.fromkeys(candidates)]
        keys = [request_key("next_token_logprobs", ident, p, c, LOGPROBS_VERSION) for p, c in pairs]
        cache = self._cache
        found = cache.get_many(keys) if cache is not None else {}
        scores: list[float | None] = [None] * len(pairs)
        for j, k in enumerate(keys):
            if k in found:
                scores[j] = _unpack(found[k]).total
        todo = [j for j, s in enumerate(scores) if s is None]
        self.usage.cache_hits += len(pairs) - len(todo)
        self.usage.cache_misses += len(todo)
        if todo:
            encoded = self._pair_ids([pairs[j][0] for j in todo], [pairs[j][1] for j in todo])
            seq_of: dict[tuple[int, ...], int] = {}
            seqs: list[list[int]] = []
            picks: list[list[tuple[int, int]]] = []
            where: list[tuple[int, int, int]] = []  # (pair, sequence, first pick) of each pair to score
            for j, (pre, cand, crosses) in zip(todo, encoded, strict=True):
                prompt, candidate = pairs[j]
                if not cand or not pre:
                    what = "has no tokens" if not cand else "follows an empty prompt with no BOS to predict it from"
                    raise ConfigError(f"next_token_logprobs: candidate {candidate!r} {what}")
                if crosses:
                    raise ConfigError(
                        f"next_token_logprobs: the tokenizer merges the start of candidate {candidate!r} into the end "
                        f"of the prompt (...{prompt[-20:]!r}): move the prompt's trailing whitespace into the candidates"
                    )
                if len(pre) + len(cand) - 1 > self.max_length:
                    raise BackendError(
                        f"next_token_logprobs: a prompt with candidate {candidate!r} has {len(pre) + len(cand)} "
                        f"tokens, max_length is {self.max_length}"
                    )
                seq = pre + cand[:-1]
                s = seq_of.setdefault(tuple(seq), len(seqs))
                if s == len(seqs):
                    seqs.append(seq)
                    picks.append([])
                where.append((j, s, len(picks[s])))
                picks[s].extend((len(pre) + k - 1, t) for k, t in enumerate(cand))
            values = self._score_picks(seqs, picks, "next-token logprobs")
            for (j, s, first), (_, cand_ids, _) in zip(where, encoded, strict=True):
                got = values[s]
                if isinstance(got, str):
                    raise BackendError(f"next_token_logprobs: prompt {pairs[j][0][-40:]!r}: {got}")
                vals = got[first : first + len(cand_ids)]
                scores[j] = float(sum(vals))
                if cache is not None:
                    cache.put(keys[j], _pack(TokenLogprobs(cand_ids, vals)), kind="logprobs", model=str(ident["model"]))
            if cache is not None:
                cache.flush()
        out: list[dict[str, float]] = []
        per = len(pairs) // max(len(prompts), 1)
        for i in range(len(prompts)):
            row = {}
            for j in range(i * per, (i + 1) * per):
                value = scores[j]
                assert value is not None
                row[pairs[j][1]] = value
            out.append(row)
        return out

    # ---- IFD: the two passes over a rendered conversation ---------------------------------------

    def answer_texts(self, conversations: Sequence[Conversation]) -> list[AnswerTexts]:
        """Each conversation's last assistant reply split for scoring, rendered by the tokenizer's chat template
        exactly as the trainer renders it (`thresher.trainer.chat.answer_texts`): `prompt` (everything before the
        reply, ending with the response header), `header` (the response header alone) and `answer` (the reply up
        to its end-of-turn token: the characters of the tokens the trainer supervises).

        IFD's conditioned pass is `logprobs(prompt, answer)`, its unconditioned pass `logprobs(header, answer)`;
        `answer_logprobs` runs both with one answer budget. Build conversations from rows with
        `thresher.data.record_messages(row)`.
        """
        from thresher.trainer.chat import answer_texts, end_of_turn_ids, resolve_chat_template

        tok = self._scoring_tokenizer()
        eot = end_of_turn_ids(tok, None, self._generation_eos())
        return answer_texts(tok, conversations, chat_template=resolve_chat_template(tok, None), eot_ids=eot)

    def score_answers(
        self,
        texts: Sequence[AnswerTexts],
        *,
        unconditioned: str = "header",
        max_length: int | None = None,
        max_answer_tokens: int | None = None,
    ) -> list[AnswerLogprobs]:
        """IFD's two passes over each answer: after `prompt`, and after `header` (`unconditioned="header"`: the
        same answer tokens, checked) or after nothing (`"bare"`: the answer tokenized on its own, Superfiltering's
        unconditioned text). Both passes keep the same answer budget: what fits in `max_length` (default: the
        backend's) after the conditioned prompt, and at most `max_answer_tokens`. A pair that cannot be scored
        (its prompt alone fills `max_length`, a served request failed) gets `error`, the others go on."""
        if unconditioned not in ("header", "bare"):
            raise ConfigError(f"score_answers: unconditioned must be 'header' or 'bare', got {unconditioned!r}")
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        errors: list[str | None] = [None] * len(texts)
        budgets: list[int | None] = []
        encoded = self._pair_ids([t.prompt for t in texts], [t.answer for t in texts])
        for k, (pre, _, _) in enumerate(encoded):
            room = limit - len(pre)
            if room < 1:
                errors[k] = f"the prompt alone has {len(pre)} tokens, max_length is {limit}: no answer token is left"
            budgets.append(max(room, 1) if max_answer_tokens is None else max(1, min(room, max_answer_tokens)))
        todo = [k for k, e in enumerate(errors) if e is None]
        answers = [texts[k].answer for k in todo]
        cut = [budgets[k] for k in todo]
        conditioned = self.logprobs([texts[k].prompt for k in todo], answers, max_continuation_tokens=cut)
        prefixes = [texts[k].header if unconditioned == "header" else "" for k in todo]
        alone = self.logprobs(prefixes, answers, max_continuation_tokens=cut)
        empty = TokenLogprobs([], [])
        out = [AnswerLogprobs(empty, empty, e) for e in errors]
        for k, c, u in zip(todo, conditioned, alone, strict=True):
            error = c.error or u.error
            if error is None and unconditioned == "header" and c.token_ids != u.token_ids:
                error = (
                    "the answer tokenizes differently after the prompt and after the header alone, so the two "
                    "passes would not score the same tokens"
                )
            out[k] = AnswerLogprobs(c, u, error)
        return out

    def answer_logprobs(
        self, conversations: Sequence[Conversation], *, max_answer_tokens: int | None = None
    ) -> list[AnswerLogprobs]:
        """IFD's two passes over each conversation's last reply: given the prompt, and given the response header
        alone, over the same answer tokens (those the trainer supervises), cut to the same budget in both passes:
        `max_answer_tokens`, and no more than fits in `max_length` after the (longer) conditioned prompt. A
        conversation that cannot be scored is a BackendError naming it (`score_answers` reports it per pair)."""
        out = self.score_answers(self.answer_texts(conversations), max_answer_tokens=max_answer_tokens)
        for k, pair in enumerate(out):
            if pair.error is not None:
                raise BackendError(f"answer_logprobs: conversation {k}: {pair.error}")
        return out


def _pack(t: TokenLogprobs) -> bytes:
    import numpy as np

    n = len(t.logprobs)
    ids = np.asarray(t.token_ids[-n:] if n else [], dtype=np.int32)
    return (
        struct.pack("<BI", 1 if t.truncated else 0, n)
        + ids.tobytes()
        + np.asarray(t.logprobs, dtype=np.float32).tobytes()
    )


def _unpack(blob: bytes) -> TokenLogprobs:
    import numpy as np

    truncated, n = struct.unpack_from("<BI", blob)
    off = struct.calcsize("<BI")
    ids = np.frombuffer(blob, dtype=np.int32, count=n, offset=off).tolist()
    lps = np.frombuffer(blob, dtype=np.float32, count=n, offset=off + 4 * n).tolist()
    return TokenLogprobs(ids, lps, truncated=bool(truncated))
