"""Token log-probabilities from a vLLM server: `prompt_logprobs` on the completions endpoint.

IFD, DEITA and perplexity need log p(token | tokens before it) over text the job supplies, which the OpenAI API
does not give: vLLM does, as its `prompt_logprobs` extension (`{"prompt_logprobs": 1}` in the request's extra body
returns, per prompt token, its own log-probability beside the top alternatives). So a user with a vLLM deployment
scores rows without loading the model in the job; only its tokenizer is loaded here (small, and local: nothing is
downloaded), so that prompts are tokenized exactly as `Transformers` tokenizes them (`TokenScorer`) and sent as
token ids, which vLLM runs as given (no BOS added, nothing re-tokenized).

One request per sequence, `max_concurrency` in flight, through the backend's client (retries, rate limits, usage);
the answer of every (prefix, continuation) pair is kept in the request cache. A pick after the last token of a
sequence (the last token of a next-token candidate) is asked as its own request with that token appended. A request
that fails after its retries fails its pair only (`TokenLogprobs.error`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from thresher.errors import BackendError, ConfigError
from thresher.llms.token_scoring import TokenScorer


class PromptLogprobs(TokenScorer):
    """`TokenScorer` over an OpenAI-compatible server that returns vLLM's `prompt_logprobs` (mixed into
    `OpenAICompatible`, whose `tokenizer` and `max_length` parameters it reads)."""

    model: str
    tokenizer: str | None
    _client: Any

    def load(self) -> Any:
        raise NotImplementedError

    def _tokenizer_source(self) -> str:
        return self.tokenizer or self.model

    def _scoring_tokenizer(self) -> Any:
        self.load()
        tok = getattr(self, "tokenizer_", None)
        if tok is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ConfigError("log-probabilities from a server need transformers for its tokenizer") from e
            src = self._tokenizer_source()
            try:
                tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"OpenAICompatible: scoring text through {self.model!r} needs its tokenizer here, and {src!r} "
                    f"cannot be loaded without a download ({e}); set tokenizer= a local directory or a hub id in "
                    "the local cache"
                ) from e
            self.tokenizer_ = tok
        return tok

    def _generation_eos(self) -> list[int]:
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(self._tokenizer_source(), local_files_only=True).eos_token_id
        except (ImportError, OSError, ValueError):
            return []
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def _score_picks(
        self, seqs: list[list[int]], picks: list[list[tuple[int, int]]], desc: str
    ) -> list[list[float] | str]:
        self.load()
        # the token sequences to send: a sequence's picks inside it are read from its own prompt_logprobs; a pick
        # at its last position (a candidate's last token) needs that token appended
        wanted: dict[tuple[int, ...], None] = {}
        inside: list[tuple[int, ...]] = []  # the request whose answer holds a sequence's picks inside it
        for seq, pick in zip(seqs, picks, strict=True):
            ends = sorted({t for p, t in pick if p == len(seq) - 1})
            for t in ends:
                wanted[(*seq, t)] = None
            inside.append((*seq, ends[0]) if ends else tuple(seq))
            wanted[inside[-1]] = None
        answers = self._client.loop_thread.run(self._ask_all(list(wanted)))
        out: list[list[float] | str] = []
        for seq, pick, within in zip(seqs, picks, inside, strict=True):
            values: list[float] = []
            error = None
            for p, t in pick:
                sent = (*seq, t) if p == len(seq) - 1 else within
                got = answers[sent]
                if isinstance(got, str):
                    error = got
                    break
                value = _logprob_at(got, p + 1, t)
                if value is None:
                    error = (
                        f"the server's prompt_logprobs has no log-probability for token {t} at position {p + 1}: "
                        "is it vLLM (prompt_logprobs in the completions API)?"
                    )
                    break
                values.append(value)
            out.append(error if error is not None else values)
        return out

    async def _ask_all(self, sequences: list[tuple[int, ...]]) -> dict[tuple[int, ...], list[Any] | str]:
        from thresher.llms.openai_compat import _Failed

        client = self._client
        transport, slots = client.for_loop()
        answers: dict[tuple[int, ...], list[Any] | str] = {}

        async def ask(ids: tuple[int, ...]) -> None:
            body = {"model": self.model, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
            async with slots:
                try:
                    data = await client.send(transport, "/completions", body, len(ids) + 1)
                except _Failed as e:
                    answers[ids] = f"prompt_logprobs request to {client.base_url} (model {self.model!r}): {e}"
                    return
            usage = data.get("usage") or {}
            self.usage.prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.usage.completion_tokens += int(usage.get("completion_tokens") or 0)
            choices = data.get("choices") or [{}]
            plp = choices[0].get("prompt_logprobs") if isinstance(choices[0], dict) else None
            if plp is None:
                plp = data.get("prompt_logprobs")
            if not isinstance(plp, list) or len(plp) != len(ids):
                found = "none" if plp is None else f"{len(plp) if isinstance(plp, list) else type(plp).__name__}"
                answers[ids] = (
                    f"the server answered no prompt_logprobs for the {len(ids)} prompt tokens (got {found}): "
                    "scoring text needs vLLM's prompt_logprobs"
                )
                return
            answers[ids] = plp

        tasks = [asyncio.ensure_future(ask(ids)) for ids in sequences]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return answers


def _logprob_at(prompt_logprobs: list[Any], position: int, token: int) -> float | None:
    """log p(token at `position`) from vLLM's per-position `{token id: {logprob, rank, decoded_token}}` dicts."""
    entry = prompt_logprobs[position]
    if not isinstance(entry, dict):
        return None
    value = entry.get(str(token), entry.get(token))  # type: ignore[call-overload]
    if isinstance(value, dict):
        value = value.get("logprob")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if value is not None:
        raise BackendError(f"prompt_logprobs: unexpected entry for token {token} at position {position}: {value!r}")
    return None
