"""`Tagger`: InsTag's open-set intention tags for each instruction, normalised across the dataset.

A chat model is asked, with our `tag` template, for the intentions of each row's request as a JSON list of
{tag, explanation} (structured output: the backend validates and re-asks). The raw tags are then normalised, as
InsTag does before using them, over the whole dataset (so the step sees all rows at once):
1. rules: Unicode NFKC, lower case, "_", "-" and "/" as spaces, other punctuation removed, spaces collapsed, each
   English word's plural made singular (a rule list: "queries" -> "query", "boxes" -> "box", "tags" -> "tag";
   words in -ss, -us, -is, -ics kept). Chinese tags keep their characters.
2. synonyms: distinct tags are embedded (the bundled all-MiniLM-L6-v2 by default) and, most frequent first, each
   tag joins the first kept tag whose cosine similarity is >= `merge_similarity` (default 0.9) or becomes a kept
   tag itself; a merged tag takes its kept tag's name. Anchoring on kept tags stops chains (a ~ b ~ c) from merging
   tags that are not alike. InsTag clusters PhraseBERT vectors; MiniLM is what ships here, and is English-only:
   raise the bound, or give another embedder, for Chinese tags.
3. frequency floor: tags on fewer than `min_count` rows after merging are dropped (InsTag drops tags seen fewer
   than 20 times in its ~400K queries; on small sets a floor of 1 or 2 fits better).
Columns: `tags` (the row's normalised tags, first-said first) and `n_tags` (InsTag's complexity measure). Metrics:
the vocabulary with row counts, the merges, the tags under the floor and the replies that gave no tags.
A row whose request failed, or whose reply had no valid JSON after the re-asks, goes to `failed` with the reply
quoted; a row the model gave an empty list keeps `tags` = [] (it is counted). Nothing is removed.
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from thresher.data.messages import history_pairs, user_text
from thresher.errors import ConfigError
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime, secret
from thresher.pipelines.prompts import LANGUAGES, Prompt
from thresher.pipelines.step import GlobalFilter
from thresher.scorers._common import Rows, clip, load_templates, templates_digest

METHOD = "tagger"
PROMPT_NAMES = ("tag",)
TAG_SCHEMA = {
    "title": "intention_tags",
    "type": "object",
    "properties": {
        "tags": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"tag": {"type": "string"}, "explanation": {"type": "string"}},
                "required": ["tag"],
            },
        }
    },
    "required": ["tags"],
}
_SPACES = re.compile(r"[\s_\-/–—]+")
_KEEP_S = ("ss", "us", "is", "ics")


def singular(word: str) -> str:
    """An English plural noun made singular by rule (not a dictionary); other words are returned as given."""
    if not word.isascii() or not word.isalpha() or len(word) <= 3 or word.endswith(_KEEP_S):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes", "zes")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def normalise_tag(tag: Any) -> str:
    """A tag after InsTag's rule step (see the module docstring); "" when nothing is left."""
    text = unicodedata.normalize("NFKC", str(tag or "")).lower()
    text = _SPACES.sub(" ", text)
    text = "".join(c for c in text if c.isalnum() or c == " ")
    return " ".join(singular(w) for w in text.split())


def merge_synonyms(tags: Sequence[str], vectors: Any, similarity: float) -> dict[str, str]:
    """{tag: the kept tag it merges into} for `tags` in order (most frequent first) with unit `vectors`."""
    import numpy as np

    kept: list[int] = []
    out: dict[str, str] = {}
    vecs = np.asarray(vectors, dtype=np.float32)
    for k, tag in enumerate(tags):
        if kept:
            sims = vecs[kept] @ vecs[k]
            best = int(np.argmax(sims))
            if float(sims[best]) >= similarity:
                out[tag] = tags[kept[best]]
                continue
        kept.append(k)
        out[tag] = tag
    return out


class Tagger(ModelStep, GlobalFilter):
    """InsTag intention tags per row (see the module docstring).

    backend: the tagging chat model (a spec dict, a backend object, or None for the embedded llama.cpp model).
    embedder: the embedding model for merging synonyms (None: the bundled all-MiniLM-L6-v2). merge_similarity:
    cosine bound for merging (None: no merging). min_count: rows a tag must appear on to be kept. language: "en"
    or "zh" (the shipped template); prompts: {"tag": file} to replace it.
    """

    inputs = ("instruction",)
    outputs = ("tags", "n_tags")
    model_params = {"backend": "chat", "embedder": "embed"}
    VERSION = "1"

    def __init__(
        self,
        *,
        backend: Mapping[str, Any] | Any | None = None,
        embedder: Mapping[str, Any] | Any | None = None,
        merge_similarity: float | None = 0.9,
        min_count: int = 1,
        language: str = "en",
        prompts: Mapping[str, str | os.PathLike[str]] | None = None,
        max_tokens: int = 256,
        temperature: float | None = 0.0,
        seed: int | None = None,
        api_key: str | None = secret(),
        batch_size: int = runtime(256),
        max_concurrency: int | None = runtime(None),
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.backend = backend
        self.embedder = embedder
        self.merge_similarity = merge_similarity
        self.min_count = min_count
        self.language = language
        self.prompts = prompts
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed
        self.api_key = api_key
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self.cache = cache
        self.progress = progress

    def _templates(self) -> dict[str, Prompt]:
        return load_templates(type(self).__name__, METHOD, {"tag": {"instruction"}}, self.language, self.prompts)

    def check(self) -> None:
        name = type(self).__name__
        if self.language not in LANGUAGES:
            raise ConfigError(f"{name}: unknown language {self.language!r}; valid: {list(LANGUAGES)}")
        sim = self.merge_similarity
        if sim is not None and (isinstance(sim, bool) or not isinstance(sim, (int, float)) or not 0 < sim <= 1):
            raise ConfigError(f"{name}: merge_similarity must be a cosine in (0, 1] or None (no merging), got {sim!r}")
        for key in ("min_count", "max_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {value!r}")
        self._templates()
        super().check()

    def fingerprint_extra(self) -> dict[str, Any]:
        return {"prompts": templates_digest(METHOD, PROMPT_NAMES, self.language, self.prompts)}

    # ---- per-run figures ------------------------------------------------------------------------

    def begin(self) -> None:
        super().begin()
        self._zero()

    def _zero(self) -> None:
        self.lock_ = threading.Lock()
        self.vocabulary_: dict[str, int] = {}
        self.merged_: dict[str, str] = {}
        self.below_floor_: dict[str, int] = {}
        self.counts_: Counter[str] = Counter()

    def metrics(self) -> dict[str, Any]:
        out = dict(super().metrics())
        if getattr(self, "vocabulary_", None) is None:
            return out
        out["tags"] = {
            "vocabulary": dict(self.vocabulary_),
            "distinct": len(self.vocabulary_),
            "merged": dict(self.merged_),
            "below_floor": dict(self.below_floor_),
            **dict(self.counts_),
        }
        return out

    # ---- the rows -------------------------------------------------------------------------------

    def keep(self, table: pa.Table) -> tuple[Any, Any, Mapping[str, Any]]:
        if getattr(self, "vocabulary_", None) is None:  # driven directly, without the engine's begin()
            self._zero()
        tpl = self._templates()["tag"]
        rows = Rows.of(table)
        errors: list[str | None] = [None] * rows.n
        convs, todo = [], []
        for i in range(rows.n):
            last = user_text(rows.instruction[i], rows.input[i])
            if not last.strip():
                errors[i] = f"{rows.name(i)}: field 'instruction' is empty; there is nothing to tag"
                continue
            try:
                asked = [u for u, _ in history_pairs(rows.history[i]) if u.strip()] + [last]
            except ValueError as e:
                errors[i] = f"{rows.name(i)}: field 'history': {e}"
                continue
            convs.append([{"role": "user", "content": tpl.render(instruction="\n\n".join(asked))}])
            todo.append(i)
        params: dict[str, Any] = {"max_tokens": self.max_tokens, "response_format": TAG_SCHEMA}
        for k in ("temperature", "seed"):
            if getattr(self, k) is not None:
                params[k] = getattr(self, k)
        backend = self.model()
        results: list[Any] = []
        for lo in range(0, len(convs), self.batch_size):
            results += backend.chat(convs[lo : lo + self.batch_size], **params)
        raw: list[list[str]] = [[] for _ in range(rows.n)]
        for i, res in zip(todo, results, strict=True):
            value = (res.parsed or [None])[0] if res.error is None else None
            if not isinstance(value, Mapping):
                quoted = f": {clip(res.text)}" if res.text is not None else ""
                errors[i] = f"{rows.name(i)}: no tags: {res.error or 'the reply is not a tag list'}{quoted}"
                self.counts_["replies_without_json"] += 1
                continue
            tags = [normalise_tag(t.get("tag")) for t in value.get("tags") or [] if isinstance(t, Mapping)]
            raw[i] = list(dict.fromkeys(t for t in tags if t))
            if not raw[i]:
                self.counts_["rows_given_no_tags"] += 1
        final = self._normalise(raw, [e is None for e in errors])
        return (
            [True] * rows.n,
            "",
            {
                "tags": pa.array([None if errors[i] else final[i] for i in range(rows.n)], type=pa.list_(pa.string())),
                "n_tags": pa.array([None if errors[i] else len(final[i]) for i in range(rows.n)], type=pa.int64()),
                "error": errors,
            },
        )

    def _normalise(self, raw: list[list[str]], ok: list[bool]) -> list[list[str]]:
        """Synonyms merged, then the frequency floor, over the rows that did not fail."""
        counts = Counter(t for tags, good in zip(raw, ok, strict=True) if good for t in tags)
        order = sorted(counts, key=lambda t: (-counts[t], t))
        mapping = {t: t for t in order}
        if self.merge_similarity is not None and len(order) > 1:
            vectors = self.model("embedder").embed(order)
            mapping = merge_synonyms(order, vectors, float(self.merge_similarity))
        merged = [list(dict.fromkeys(mapping[t] for t in tags)) if good else [] for tags, good in zip(raw, ok, strict=True)]
        kept_counts = Counter(t for tags in merged for t in tags)
        final = [[t for t in tags if kept_counts[t] >= self.min_count] for tags in merged]
        with self.lock_:
            self.vocabulary_ = {t: c for t, c in sorted(kept_counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= self.min_count}
            self.merged_ = {t: m for t, m in mapping.items() if t != m}
            self.below_floor_ = {t: c for t, c in kept_counts.items() if c < self.min_count}
            self.counts_["rows_tagged"] = sum(1 for tags, good in zip(final, ok, strict=True) if good and tags)
        return final
