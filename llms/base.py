"""The small protocol steps depend on, and the values backends return.

Steps ask for a capability, never a class: `ChatBackend` (`chat`, `complete`), `EmbeddingBackend` (`embed`) and
`LogprobBackend` (`logprobs`, `next_token_logprobs`). Any object with those methods plugs in — the bundled
llama.cpp model, an OpenAI-compatible server, a local transformers model, or a test double.

Every chat/complete call takes a list of prompts and returns one `Completion` per prompt, in order. A prompt that
could not be answered (after retries) carries `error` and the others are unaffected: one bad request never voids its
batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

Message = Mapping[str, Any]
"""One chat message: `{"role": "system" | "user" | "assistant", "content": str}`."""
Conversation = Sequence[Message]


@dataclass
class Completion:
    """The answer to one prompt: `n` samples, or an error."""

    texts: list[str | None]
    finish_reasons: list[str | None] = field(default_factory=list)
    #: validated structured outputs (pydantic objects or JSON values), one per sample, when a schema was asked for
    parsed: list[Any] | None = None
    #: why this prompt has no (complete) answer; None when every sample is there
    error: str | None = None
    #: tokens paid for in this call (cache hits cost nothing)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: how many of the samples came from the request cache
    cached: int = 0
    #: per sample, the token log-probabilities the server returned (when `logprobs=True` was asked)
    logprobs: list[Any] | None = None

    @property
    def text(self) -> str | None:
        """The first sample's text (None when it failed)."""
        return self.texts[0] if self.texts else None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class TokenLogprobs:
    """Log-probabilities of each token of a continuation given its prefix (natural log)."""

    token_ids: list[int]
    logprobs: list[float]
    tokens: list[str] = field(default_factory=list)
    #: the continuation was cut to fit the token budget
    truncated: bool = False
    #: why a served model could not score this pair (logprobs are then empty); local models raise instead
    error: str | None = None

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per token (the cross-entropy IFD compares); nan when empty."""
        return -self.total / len(self.logprobs) if self.logprobs else float("nan")


@dataclass
class Usage:
    """What a backend did and what it cost; steps report `as_dict()` in the run manifest."""

    requests: int = 0  # calls sent to the model (retries and re-asks included)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0  # samples / embeddings answered from the request cache
    cache_misses: int = 0
    retries: int = 0
    reasks: int = 0  # structured-output replies that failed validation and were asked again
    errors: int = 0  # prompts that ended with an error
    cost_usd: float = 0.0
    batch_requests: int = 0  # requests answered through Batch API jobs (not counted in `requests`)
    batches: int = 0  # Batch API jobs submitted

    def add(self, other: Usage) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def copy(self) -> Usage:
        return Usage(**{f.name: getattr(self, f.name) for f in fields(self)})

    def since(self, before: Usage) -> Usage:
        """What was done after `before` (a `copy()` taken earlier) was taken."""
        return Usage(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["cost_usd"] = round(self.cost_usd, 6)
        return out


@runtime_checkable
class ChatBackend(Protocol):
    """Generates text: chat conversations or raw prompts, n samples each."""

    usage: Usage

    def chat(self, conversations: Sequence[Conversation], **params: Any) -> list[Completion]:
        """One Completion per conversation. params: n, max_tokens, temperature, top_p, stop, seed,
        response_format (a pydantic model class or a JSON schema dict), logprobs, top_logprobs, extra."""
        ...

    def complete(self, prompts: Sequence[str], **params: Any) -> list[Completion]:
        """Raw text continuation of each prompt (no chat template)."""
        ...

    def identity(self) -> dict[str, Any]:
        """What determines the answers (kind, model, ...): hashed into step fingerprints and cache keys."""
        ...


@runtime_checkable
class EmbeddingBackend(Protocol):
    """Turns texts into L2-normalised float32 vectors."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """An array of shape (len(texts), dim), dtype float32, rows of unit length."""
        ...

    def identity(self) -> dict[str, Any]: ...


@runtime_checkable
class LogprobBackend(Protocol):
    """Scores given text under a model (IFD, DEITA, expected judge scores).

    Texts are rendered already (a chat template applied, its BOS included when it writes one); a backend tokenizes
    prefix + continuation as one text, as its trainer would, adding no special token but the tokenizer's BOS where
    the text lacks it, and scores the tokens that start inside the continuation.
    """

    def logprobs(
        self,
        prefixes: Sequence[str],
        continuations: Sequence[str],
        *,
        max_continuation_tokens: int | Sequence[int | None] | None = None,
    ) -> list[TokenLogprobs]:
        """Per-token log-probabilities of each continuation given its prefix ("" = unconditioned: from the BOS
        alone, or with no score for the first token when the tokenizer has no BOS). `max_continuation_tokens`, one
        budget or one per pair, cuts continuations to that many tokens (`truncated=True`). IFD's unconditioned
        prefix is the template's response header, not "" (`Transformers.answer_texts`)."""
        ...

    def next_token_logprobs(self, prompts: Sequence[str], candidates: Sequence[str]) -> list[dict[str, float]]:
        """For each prompt, the log-probability that it goes on with each candidate, scored whole: the sum over the
        candidate's tokens (for a one-token candidate, the next-token log-probability). Candidates are appended as
        written: a leading space is part of the candidate."""
        ...

    def identity(self) -> dict[str, Any]: ...


GEN_PARAMS = (
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "response_format",
    "logprobs",
    "top_logprobs",
    "extra",
)
"""The generation parameters every ChatBackend understands (others go in `extra`, passed to the server as is)."""
CALL_OPTIONS = ("progress",)
"""Options of a call that do not change its answers (and are not part of cache keys)."""


def check_gen_params(params: Mapping[str, Any], where: str) -> None:
    from thresher.errors import ConfigError

    unknown = [k for k in params if k not in GEN_PARAMS and k not in CALL_OPTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown generation parameter(s) {unknown}; valid: {list(GEN_PARAMS)}")
    n = params.get("n", 1)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{where}: n must be a positive integer, got {n!r}")
