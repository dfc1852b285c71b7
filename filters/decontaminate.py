"""Decontaminate: drop rows that share text with benchmark files (n-gram overlap), or that say the same thing as a
benchmark prompt (embedding similarity, optional), and say which benchmark record, which text and which n-gram.

Text as the n-grams see it. NFKC, case-folded; punctuation and other symbols are separators, never tokens. Two
views of every text: words (runs of letters and digits outside CJK scripts) for n-grams of `ngram` words (13, the
lm-evaluation-harness default), and CJK characters (Han, kana, hangul: the set RougeFilter's "cjk" tokenizer uses)
for n-grams of `cjk_ngram` characters. Why 20 characters: a Chinese word is about 1.5 characters, so 13 words are
about 20 characters; shorter windows hit the boilerplate of Chinese prompts (请根据以下内容回答问题 is 11 characters
by itself). In the character view the non-CJK words are left out, and in the word view the CJK characters.

What matches. A row field (instruction, input, output by default) is contaminated when it holds
- an n-gram of a benchmark text: `ngram` words (or `cjk_ngram` characters) in a row, found in both;
- the whole of a benchmark text shorter than an n-gram but at least `min_ngram` words (`min_cjk_ngram`
  characters) long: a short benchmark question copied into a longer prompt still counts (13-grams alone would
  miss Vicuna's 8-word questions);
- exactly the tokens of a benchmark text shorter than that, down to `min_exact` words (4; 1.5 times as many CJK
  characters): a whole field equal to "What is the meaning of life?" is a copy, the same six words inside a longer
  prompt are not evidence, and a field equal to "True" or "Harry Potter" (answers and inputs of Self-Instruct's
  test set) is not either.
Paraphrases that keep a 13-word run (a changed opening, a reordered sentence around a long quote, a copied answer)
are caught by n-grams; those that change every few words (synonyms, translation, rewording) need the embedding
route: `embedding_threshold` compares each row's prompt (`embed_fields`) with each benchmark record's prompt by
cosine similarity of embeddings (bundled all-MiniLM-L6-v2 by default; FAISS inner-product search).

How it stays fast. Every token gets a random 64-bit value, and a polynomial hash over a window is built for all
windows of all texts at once, one length at a time (numpy; a window of length k+1 is the window of length k times
the base plus the next token's value). The benchmark side is an index: per length, a sorted array of window
hashes (a hash set that numpy searches in bulk). Rows are hashed the same way, in chunks, and looked up with
`searchsorted`; every hash hit is then checked token by token, so a hash collision never removes a row.

Benchmark files: any file thresher's readers take, read into records (instruction, input, output, history), or,
for files in no known layout (Vicuna's `text`, WizardLM's `Instruction`, LIMA's `conversations` as one string),
`{"path": ..., "fields": [...]}` naming the keys whose text counts (lists and objects inside are searched for
text). They count in the fingerprint by content.
"""

from __future__ import annotations

import math
import os
import re
import time
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from thresher.errors import ConfigError, RecordError, StepError
from thresher.filters.rouge import _CJK_CHARS
from thresher.pipelines.fingerprint import file_digest
from thresher.pipelines.model_step import ModelStep
from thresher.pipelines.params import runtime
from thresher.pipelines.step import GlobalFilter

_CJK = re.compile(f"[{_CJK_CHARS}]")
_WORD = re.compile(r"[^\W_]+")
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2^64
_ROWS_PER_CHUNK = 20_000
_SPEC_KEYS = frozenset({"path", "fields", "layout"})
_TEXT_COLUMNS = ("instruction", "input", "output", "history")


def views(text: str) -> tuple[list[str], list[str]]:
    """(word tokens, CJK characters) of a text, as the module docstring defines them."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return _WORD.findall(_CJK.sub(" ", t)), _CJK.findall(t)


def _strings(value: Any) -> Iterable[str]:
    """Every non-empty string in a value (lists and dicts searched), in order."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


@dataclass
class Benchmark:
    """The texts of benchmark files: one entry per (record, field) text, and one prompt per record."""

    files: list[str] = field(default_factory=list)
    # per text
    file: list[int] = field(default_factory=list)
    record: list[int] = field(default_factory=list)  # 1-based record number in its file
    field_name: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    # per record: the prompt the embedding route compares with
    prompt_file: list[int] = field(default_factory=list)
    prompt_record: list[int] = field(default_factory=list)
    prompt: list[str] = field(default_factory=list)

    def add(self, file: int, record: int, name: str, value: Any) -> None:
        for s in _strings(value):
            self.file.append(file)
            self.record.append(record)
            self.field_name.append(name)
            self.text.append(s)


def read_benchmark(spec: Mapping[str, Any], file: int, into: Benchmark) -> None:
    """Add one benchmark file's texts (see the module docstring) to `into`."""
    from thresher.data.messages import user_text

    path = Path(spec["path"])
    fields = spec.get("fields")
    if fields is None:
        from thresher.data.layouts import EXTRA_INSTANCES
        from thresher.data.readers import read_records

        try:
            table = read_records(path, layout=spec.get("layout"))
        except RecordError as e:
            if "cannot tell the layout" in str(e):
                raise ConfigError(
                    f"Decontaminate: {e}. Or name the fields that hold the benchmark's text: "
                    f"{{'path': {os.fspath(path)!r}, 'fields': [...]}}"
                ) from e
            raise
        cols = [c for c in (*_TEXT_COLUMNS, EXTRA_INSTANCES) if c in table.column_names]
        data = {c: table.column(c).to_pylist() for c in cols}
        inputs = data.get("input")
        for r in range(table.num_rows):
            for c in cols:
                into.add(file, r + 1, c, data[c][r])
            into.prompt_file.append(file)
            into.prompt_record.append(r + 1)
            into.prompt.append(user_text(data["instruction"][r], inputs[r] if inputs is not None else None))
        return
    from thresher.data.layouts import MISSING
    from thresher.data.readers import _error
    from thresher.data.sources import detect_format, load

    src = load(path, detect_format(path, None))
    frame = src.frame
    if frame.bad:
        i = min(frame.bad)
        raise _error(src, i, frame.bad[i])
    absent = [f for f in fields if frame.get(f) is None]
    if absent and frame.n:
        raise ConfigError(
            f"Decontaminate: benchmark file {os.fspath(path)!r} has no field(s) {absent}; its records have: "
            f"{sorted(frame.columns)}"
        )
    columns = {f: frame.values(f) for f in fields}
    for r in range(frame.n):
        parts = []
        for f in fields:
            v = columns[f][r]
            if v is MISSING or v is None:
                continue
            into.add(file, r + 1, f, v)
            parts += list(_strings(v))
        into.prompt_file.append(file)
        into.prompt_record.append(r + 1)
        into.prompt.append("\n".join(parts))


class _Tokens:
    """Token ids of many texts, one after another, with where each text starts and ends."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.ids = ids
        self.lengths = lengths
        self.starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64) if len(lengths) else lengths
        text_of = np.repeat(np.arange(len(lengths)), lengths)
        self.text_of = text_of
        # how many tokens are left in its text from each position (a window of k fits where this is >= k)
        self.left = (self.starts + lengths)[text_of] - np.arange(len(ids)) if len(ids) else np.zeros(0, np.int64)


class NgramIndex:
    """One view (words or CJK characters) of the benchmark texts, indexed by window hashes per length."""

    def __init__(self, n: int, min_n: int, min_exact: int, seed: int = 0) -> None:
        self.n, self.min_n, self.min_exact = n, min_n, min_exact
        self.vocab: dict[str, int] = {}
        self.seed = seed
        self.tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # k -> (hashes, text, start)
        self.tokens: _Tokens | None = None
        self.values: np.ndarray = np.zeros(0, np.uint64)

    def _ids(self, texts: Sequence[list[str]], grow: bool) -> _Tokens:
        vocab = self.vocab
        unknown = -1
        flat: list[int] = []
        for toks in texts:
            if grow:
                flat += [vocab.setdefault(t, len(vocab)) for t in toks]
            else:
                flat += [vocab.get(t, unknown) for t in toks]
        return _Tokens(np.array(flat, dtype=np.int64), np.array([len(t) for t in texts], dtype=np.int64))

    def _windows(self, tok: _Tokens, lengths: Iterable[int]) -> Iterable[tuple[int, np.ndarray]]:
        """(k, hash of the window of length k starting at each position) for k in `lengths` (ascending);
        entries of windows that do not fit in their text are garbage: mask them with `tok.left >= k`."""
        want = sorted(set(lengths))
        if not want or not len(tok.ids):
            return
        vals = self.values[tok.ids]  # id -1 takes the last slot: the value of every unknown token
        h = np.zeros(len(vals), dtype=np.uint64)
        m = len(vals)
        for k in range(1, want[-1] + 1):
            if k > m:
                return
            np.multiply(h[: m - k + 1], _BASE, out=h[: m - k + 1])
            np.add(h[: m - k + 1], vals[k - 1 :], out=h[: m - k + 1])
            if k in want:
                yield k, h[: m - k + 1]

    def build(self, texts: Sequence[list[str]]) -> None:
        tok = self._ids(texts, grow=True)
        rng = np.random.default_rng(self.seed)
        self.values = rng.integers(0, 2**63, size=len(self.vocab) + 1, dtype=np.int64).astype(np.uint64) * 2 + 1
        self.tokens = tok
        whole = {int(k) for k in np.unique(tok.lengths) if self.min_exact <= k < self.n}
        for k, h in self._windows(tok, whole | {self.n}):
            pos = np.arange(len(h))
            fit = tok.left[: len(h)] >= k
            if k == self.n:
                sel = pos[fit]
            else:  # whole texts of length k only: windows at a text's start that span all of it
                sel = tok.starts[tok.lengths == k]
            order = np.lexsort((sel, h[sel]))
            sel = sel[order]
            self.tables[k] = (h[sel].copy(), tok.text_of[sel], sel)

    def search(self, texts: Sequence[list[str]]) -> list[tuple[int, int, int, int]]:
        """Matches of `texts` against the index: (text, start, length, benchmark text), every verified hit."""
        assert self.tokens is not None
        bench = self.tokens
        tok = self._ids(texts, grow=False)
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        for k, h in self._windows(tok, self.tables):
            keys, bench_text, bench_start = self.tables[k]
            fit = tok.left[: len(h)] >= k
            if k == self.n or k >= self.min_n:
                pos = np.flatnonzero(fit)
            else:  # shorter than min_n: the row's whole text must be the benchmark text
                pos = tok.starts[tok.lengths == k]
            q = h[pos]
            at = np.searchsorted(keys, q)
            hit = at < len(keys)
            hit[hit] = keys[at[hit]] == q[hit]
            pos, at = pos[hit], at[hit]
            if not len(pos):
                continue
            # token by token: a hash collision never counts
            span = np.arange(k)
            same = (tok.ids[pos[:, None] + span] == bench.ids[bench_start[at][:, None] + span]).all(axis=1)
            found.append((pos[same], bench_text[at[same]], bench_start[at[same]], k))
        out = []
        for pos, btext, _, k in found:
            text = tok.text_of[pos]
            start = pos - tok.starts[text]
            out += list(zip(text.tolist(), start.tolist(), [k] * len(pos), btext.tolist(), strict=True))
        return out


def _normalise_spec(entry: Any) -> dict[str, Any]:
    if isinstance(entry, (str, os.PathLike)):
        return {"path": os.fspath(entry)}
    if isinstance(entry, Mapping):
        unknown = sorted(set(entry) - _SPEC_KEYS)
        if unknown or "path" not in entry:
            raise ConfigError(
                f"Decontaminate: a benchmark is a path or a mapping with 'path' and optionally 'fields' and "
                f"'layout'; got keys {sorted(entry)}"
            )
        out: dict[str, Any] = {"path": os.fspath(entry["path"])}
        if entry.get("fields") is not None:
            f = entry["fields"]
            if isinstance(f, str) or not isinstance(f, (list, tuple)) or not f or not all(isinstance(x, str) for x in f):
                raise ConfigError(f"Decontaminate: benchmark {out['path']!r}: fields must be a list of key names, got {f!r}")
            out["fields"] = list(f)
        if entry.get("layout") is not None:
            out["layout"] = entry["layout"]
        return out
    raise ConfigError(f"Decontaminate: a benchmark is a path or a mapping with 'path'; got {type(entry).__name__}")


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class Decontaminate(ModelStep, GlobalFilter):
    """Drop rows that share an n-gram with, contain, or (optionally) paraphrase a benchmark text; see the module
    docstring for what matches.

    benchmarks: paths, or {"path", "fields", "layout"} mappings. fields: the row columns checked (text, or lists of
    text such as `history`). ngram / cjk_ngram: n-gram length in words / CJK characters (13 / 20). min_ngram /
    min_cjk_ngram: shorter benchmark texts down to this length count when a row contains them whole (8 / 12);
    shorter still, down to `min_exact` words (4), only a row field equal to them counts. embedding_threshold: cosine at which a row's prompt
    (`embed_fields` joined) is too close to a benchmark record's prompt (None: no embedding route; with MiniLM a
    reworded Vicuna question scored 0.83 against its original, so paraphrases need about 0.75-0.8, and
    `benchmark_similarity` shows where a set's rows lie before you choose). embedder: the embedding model (None: bundled MiniLM).

    A removed row gets `benchmark_file`, `benchmark_record` (1-based record number in that file),
    `benchmark_text` (the benchmark text it matched), `matched_field` and `matched_ngram` (the shared n-gram, or
    the whole benchmark text, as tokens); with the embedding route every row gets `benchmark_similarity` (its
    highest cosine to a benchmark prompt), so the threshold can be moved without embedding again.
    """

    inputs = ("id",)
    outputs = ("benchmark_file", "benchmark_record", "benchmark_text", "matched_field", "matched_ngram",
               "benchmark_similarity")
    model_params = {"embedder": "embed"}
    VERSION = "1"

    def __init__(
        self,
        *,
        benchmarks: Sequence[str | os.PathLike[str] | Mapping[str, Any]] = (),
        fields: Sequence[str] = ("instruction", "input", "output"),
        ngram: int = 13,
        cjk_ngram: int = 20,
        min_ngram: int = 8,
        min_cjk_ngram: int = 12,
        min_exact: int = 4,
        embedding_threshold: float | None = None,
        embed_fields: Sequence[str] = ("instruction", "input"),
        embedder: Mapping[str, Any] | Any | None = None,
        cache: bool = runtime(True),
        progress: bool = runtime(False),
    ) -> None:
        self.benchmarks = benchmarks
        self.fields = fields
        self.ngram = ngram
        self.cjk_ngram = cjk_ngram
        self.min_ngram = min_ngram
        self.min_cjk_ngram = min_cjk_ngram
        self.min_exact = min_exact
        self.embedding_threshold = embedding_threshold
        self.embed_fields = embed_fields
        self.embedder = embedder
        self.cache = cache
        self.progress = progress

    def reads(self) -> tuple[str, ...]:
        extra = tuple(self.embed_fields) if self.embedding_threshold is not None else ()
        return tuple(dict.fromkeys(("id", *self.fields, *extra)))

    def _specs(self) -> list[dict[str, Any]]:
        if isinstance(self.benchmarks, (str, os.PathLike, Mapping)) or not isinstance(self.benchmarks, (list, tuple)):
            raise ConfigError(f"Decontaminate: benchmarks must be a list of files, got {self.benchmarks!r}")
        return [_normalise_spec(b) for b in self.benchmarks]

    def check(self) -> None:
        name = type(self).__name__
        specs = self._specs()
        if not specs:
            raise ConfigError(f"{name}: give at least one benchmark file in benchmarks=[...]")
        for s in specs:
            if not Path(s["path"]).exists():
                raise ConfigError(f"{name}: benchmark file {s['path']!r} does not exist")
        for key in ("fields", "embed_fields"):
            v = getattr(self, key)
            if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"{name}: {key} must be a list of column names, got {v!r}")
        for key in ("ngram", "cjk_ngram", "min_ngram", "min_cjk_ngram", "min_exact"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}: {key} must be a positive integer, got {v!r}")
        if self.min_ngram > self.ngram or self.min_cjk_ngram > self.cjk_ngram:
            raise ConfigError(f"{name}: min_ngram / min_cjk_ngram must not exceed ngram / cjk_ngram")
        t = self.embedding_threshold
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not -1 <= t <= 1):
            raise ConfigError(f"{name}: embedding_threshold must be a cosine in [-1, 1] or None, got {t!r}")
        super().check()

    def semantic_params(self) -> dict[str, Any]:
        params = super().semantic_params()
        # files count by content (fingerprint_extra), not by where they lie
        params["benchmarks"] = [{k: v for k, v in s.items() if k != "path"} for s in self._specs()]
        if self.embedding_threshold is None:
            params.pop("embedder", None)
            params.pop("embed_fields", None)
        return params

    def fingerprint_extra(self) -> dict[str, Any]:
        digests = []
        for s in self._specs():
            if not Path(s["path"]).exists():
                raise ConfigError(f"Decontaminate: benchmark file {s['path']!r} does not exist")
            digests.append(file_digest(s["path"]))
        return {"benchmark_files": digests}

    def load(self) -> None:
        if self.embedding_threshold is not None:  # the embedding model only when the route is on
            super().load()
        if getattr(self, "bench_", None) is not None:
            return
        t0 = time.perf_counter()
        bench = Benchmark()
        for i, spec in enumerate(self._specs()):
            bench.files.append(spec["path"])
            read_benchmark(spec, i, bench)
        toks = [views(t) for t in bench.text]
        words = NgramIndex(self.ngram, self.min_ngram, min(self.min_exact, self.min_ngram), seed=1)
        words.build([w for w, _ in toks])
        cjk_exact = min(math.ceil(1.5 * self.min_exact), self.min_cjk_ngram)
        cjk = NgramIndex(self.cjk_ngram, self.min_cjk_ngram, cjk_exact, seed=2)
        cjk.build([c for _, c in toks])
        self.bench_: Benchmark | None = bench
        self.indexes_ = {"words": words, "cjk": cjk}
        self.index_seconds_ = time.perf_counter() - t0

    def unload(self) -> None:
        super().unload()
        self.bench_ = None

    def begin(self) -> None:
        super().begin()
        self.stats_: dict[str, Any] = {}

    # ---- the rows -------------------------------------------------------------------------------

    def _field_texts(self, table: pa.Table, name: str) -> list[str]:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type):
            return ["" if v is None else v for v in col.to_pylist()]
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_struct(col.type):
            return ["\n".join(_strings(v)) for v in col.to_pylist()]
        raise StepError(f"Decontaminate: column {name!r} must hold text (or lists of text), found {col.type}")

    def keep(self, table: pa.Table) -> tuple[Any, Any, dict[str, Any]]:
        self.load()
        bench = self.bench_
        assert bench is not None
        t0 = time.perf_counter()
        n = table.num_rows
        fields = list(self.fields)
        texts = {f: self._field_texts(table, f) for f in fields}
        # per row: (field order, start, -length, kind, benchmark text, matched tokens)
        best: dict[int, tuple[int, int, int, str, int, str]] = {}
        for lo in range(0, n, _ROWS_PER_CHUNK):
            hi = min(n, lo + _ROWS_PER_CHUNK)
            seg = [(r, fi) for r in range(lo, hi) for fi in range(len(fields))]
            toks = [views(texts[fields[fi]][r]) for r, fi in seg]
            for kind, index, joiner, which in (("words", self.indexes_["words"], " ", 0),
                                               ("cjk", self.indexes_["cjk"], "", 1)):
                view = [t[which] for t in toks]
                for s, start, k, btext in index.search(view):
                    r, fi = seg[s]
                    key = (fi, start, -k, kind, btext, joiner.join(view[s][start : start + k]))
                    if r not in best or key < best[r]:
                        best[r] = key
        sims = None
        if self.embedding_threshold is not None:
            sims, nearest = self._embedding_route(table)
        keep = np.ones(n, dtype=bool)
        out: dict[str, list[Any]] = {c: [None] * n for c in self.outputs}
        reasons: list[str | None] = [None] * n
        counts = {"ngram": 0, "contains": 0, "equals": 0, "embedding": 0}
        for r, (fi, _, negk, kind, bt, gram) in best.items():
            keep[r] = False
            k = -negk
            n_full = self.ngram if kind == "words" else self.cjk_ngram
            n_min = self.min_ngram if kind == "words" else self.min_cjk_ngram
            unit = "word" if kind == "words" else "CJK-character"
            f, rec = bench.files[bench.file[bt]], bench.record[bt]
            where = f"{f} record {rec} ({bench.field_name[bt]})"
            if k == n_full:
                counts["ngram"] += 1
                why = f"{fields[fi]} shares the {k}-{unit} n-gram {gram!r} with {where}"
            elif k >= n_min:
                counts["contains"] += 1
                why = f"{fields[fi]} contains the whole of {where} ({k} {unit}s)"
            else:
                counts["equals"] += 1
                why = f"{fields[fi]} equals {where}"
            reasons[r] = f"{why}: {_clip(bench.text[bt])!r}"
            out["benchmark_file"][r], out["benchmark_record"][r] = f, rec
            out["benchmark_text"][r], out["matched_field"][r], out["matched_ngram"][r] = bench.text[bt], fields[fi], gram
        if sims is not None:
            out["benchmark_similarity"] = sims.tolist()
            for r in np.flatnonzero(keep & (sims >= float(self.embedding_threshold or 0))).tolist():
                keep[r] = False
                counts["embedding"] += 1
                p = int(nearest[r])
                f, rec = bench.files[bench.prompt_file[p]], bench.prompt_record[p]
                reasons[r] = (f"prompt has cosine similarity {sims[r]:.4f} >= {self.embedding_threshold} with {f} "
                              f"record {rec}: {_clip(bench.prompt[p])!r}")
                out["benchmark_file"][r], out["benchmark_record"][r] = f, rec
                out["benchmark_text"][r] = bench.prompt[p]
        self.stats_ = {
            "rows": n,
            "removed": int((~keep).sum()),
            **{f"removed_by_{k}": v for k, v in counts.items()},
            "benchmark_files": len(bench.files),
            "benchmark_texts": len(bench.text),
            "index_seconds": round(self.index_seconds_, 4),
            "search_seconds": round(time.perf_counter() - t0, 4),
        }
        types = {"benchmark_record": pa.int64(), "benchmark_similarity": pa.float64()}
        columns = {c: pa.array(v, types.get(c, pa.string())) for c, v in out.items()}
        return keep, reasons, columns

    def _embedding_route(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """(each row's highest cosine to a benchmark prompt, which prompt), by exact FAISS inner-product search."""
        import faiss

        bench = self.bench_
        assert bench is not None
        parts = [self._field_texts(table, f) for f in self.embed_fields]
        rows = ["\n".join(p for p in ps if p) for ps in zip(*parts, strict=True)]
        embedder = self.model("embedder")
        b = np.ascontiguousarray(embedder.embed(bench.prompt), dtype=np.float32)
        q = np.ascontiguousarray(embedder.embed(rows), dtype=np.float32)
        if not len(rows) or not len(b):
            return np.full(len(rows), -1.0), np.zeros(len(rows), dtype=np.int64)
        index = faiss.IndexFlatIP(b.shape[1])
        index.add(b)
        sims, nearest = index.search(q, 1)
        return sims[:, 0].astype(np.float64), nearest[:, 0]

    def metrics(self) -> dict[str, Any]:
        return {**super().metrics(), **getattr(self, "stats_", {})}
