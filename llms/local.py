"""What in-process chat backends (llama.cpp, transformers) share: cache lookups, n samples, structured output with
re-asks, usage and per-prompt errors. A subclass only says how to generate a list of items (`_generate`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from thresher.errors import ConfigError
from thresher.llms.base import Completion, Conversation, Usage, check_gen_params
from thresher.llms.cache import RequestCache, request_key, resolve_cache
from thresher.llms.http import dumps, loads
from thresher.llms.structured import Schema, reask_message


@dataclass
class GenItem:
    """One sample to generate: a conversation (chat) or a prompt (completion)."""

    messages: list[dict[str, Any]] | None
    prompt: str | None
    sampling: dict[str, Any]  # max_tokens, temperature, top_p, stop, seed (already offset per sample), extra...
    schema: Schema | None


@dataclass
class GenOut:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LocalChatBackend:
    """Base of in-process chat backends. Subclasses set `kind`, implement `load`, `identity` and `_generate`."""

    kind = "local"
    usage: Usage
    cache: bool | str | os.PathLike[str] | RequestCache
    max_reasks: int
    progress: bool
    _cache: RequestCache | None

    def _generate(self, items: list[GenItem]) -> list[GenOut | Exception]:
        raise NotImplementedError

    def _generate_iter(self, items: list[GenItem]) -> Iterator[tuple[int, GenOut | Exception]]:
        """(index, result) for every item, in the order they finish; each is recorded (and cached) as it comes, so a
        killed run keeps every answer it had. The default generates `batch_size` items at a time, in order."""
        step = max(1, int(getattr(self, "batch_size", 1) or 1))
        for i in range(0, len(items), step):
            yield from enumerate(self._generate(items[i : i + step]), start=i)

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def load(self) -> Any:
        raise NotImplementedError

    def __thresher_fingerprint__(self) -> dict[str, Any]:
        return self.identity()

    @property
    def request_cache(self) -> RequestCache | None:
        self.load()
        return self._cache

    def _open_cache(self) -> None:
        self._cache = resolve_cache(self.cache)

    # ---- public calls ---------------------------------------------------------------------------

    def chat(self, conversations: Sequence[Conversation], **params: Any) -> list[Completion]:
        convs = []
        for i, conv in enumerate(conversations):
            if isinstance(conv, (str, bytes)) or not isinstance(conv, Sequence) or not conv:
                raise ConfigError(f"conversation {i}: expected a non-empty list of {{'role', 'content'}} messages")
            msgs = []
            for m in conv:
                if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                    raise ConfigError(f"conversation {i}: every message needs 'role' and 'content', got {m!r}")
                msgs.append(dict(m))
            convs.append(msgs)
        return self._run(convs, None, params)

    def complete(self, prompts: Sequence[str], **params: Any) -> list[Completion]:
        if params.get("response_format") is not None:
            raise ConfigError("complete(): response_format needs chat()")
        return self._run(None, [str(p) for p in prompts], params)

    # ---- engine ---------------------------------------------------------------------------------

    def _run(
        self, chats: list[list[dict[str, Any]]] | None, prompts: list[str] | None, params: dict[str, Any]
    ) -> list[Completion]:
        self.load()
        check_gen_params(params, type(self).__name__)
        if params.get("logprobs"):
            raise ConfigError(f"{type(self).__name__}.chat: logprobs=True is not supported; use logprobs() instead")
        n: int = params.get("n", 1)
        schema = Schema.of(params["response_format"]) if params.get("response_format") is not None else None
        sampling = {
            k: params[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed") if params.get(k) is not None
        }
        extra = dict(params.get("extra") or {})
        kind = "chat" if chats is not None else "completion"
        key_params = {**sampling, **extra, "schema": schema.key() if schema else None}
        ident = self.identity()
        whats: list[Any] = list(chats) if chats is not None else list(prompts or [])
        keys: list[list[str]] = []
        for what in whats:
            base = request_key(kind, ident, what, key_params)
            keys.append([hashlib.blake2b(f"{base}:{s}".encode(), digest_size=16).hexdigest() for s in range(n)])
        results = [
            Completion(texts=[None] * n, finish_reasons=[None] * n, parsed=[None] * n if schema else None)
            for _ in whats
        ]
        cache = self._cache
        found = cache.get_many([k for ks in keys for k in ks]) if cache is not None else {}
        todo: list[tuple[int, int]] = []
        for r, ks in enumerate(keys):
            for s, key in enumerate(ks):
                hit = found.get(key)
                if hit is None:
                    todo.append((r, s))
                    self.usage.cache_misses += 1
                    continue
                rec = loads(hit)
                results[r].texts[s], results[r].finish_reasons[s] = rec.get("text"), rec.get("finish_reason")
                results[r].cached += 1
                self.usage.cache_hits += 1

        def item(r: int, s: int, messages: list[dict[str, Any]] | None = None) -> GenItem:
            smp = dict(sampling, **extra)
            if "seed" in smp:
                smp["seed"] = int(smp["seed"]) + s
            msgs = messages if messages is not None else (chats[r] if chats is not None else None)
            return GenItem(msgs, None if chats is not None else whats[r], smp, schema)

        bar = None
        if self.progress or params.get("progress"):
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=type(self).__name__, unit="sample")
        for i, out in self._generate_iter([item(r, s) for r, s in todo]):
            r, s = todo[i]
            self._record(results[r], r, s, out, keys[r][s], kind)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

        if schema is not None:
            for r, res in enumerate(results):
                assert res.parsed is not None
                for s in range(n):
                    if res.texts[s] is not None:
                        self._validate(res, r, s, keys[r][s], item, kind, schema)
        for r, res in enumerate(results):
            if res.error is None and any(t is None for t in res.texts):
                res.error = f"{kind} {r}: no answer for sample(s) {[i for i, t in enumerate(res.texts) if t is None]}"
            if res.error is not None:
                self.usage.errors += 1
        if cache is not None:
            cache.flush()
        return results

    def _record(self, res: Completion, r: int, s: int, out: GenOut | Exception, key: str | None, kind: str) -> bool:
        self.usage.requests += 1
        if isinstance(out, Exception):
            res.error = f"{kind} {r}, sample {s}: {type(self).__name__} failed: {type(out).__name__}: {out}"
            return False
        res.texts[s], res.finish_reasons[s] = out.text, out.finish_reason
        res.prompt_tokens += out.prompt_tokens
        res.completion_tokens += out.completion_tokens
        self.usage.prompt_tokens += out.prompt_tokens
        self.usage.completion_tokens += out.completion_tokens
        if key is not None and self._cache is not None:
            self._cache.put(
                key,
                dumps({"text": out.text, "finish_reason": out.finish_reason}),
                kind=kind,
                model=self.identity().get("model", ""),
            )
        return True

    def _validate(self, res: Completion, r: int, s: int, key: str, item: Any, kind: str, schema: Schema) -> None:
        assert res.parsed is not None
        text = res.texts[s]
        conv = list(item(r, s).messages or [])
        problem = ""
        for attempt in range(self.max_reasks + 1):
            try:
                res.parsed[s] = schema.validate(text)
                res.texts[s] = text
                return
            except ValueError as e:
                problem = str(e)
            if attempt == self.max_reasks:
                break
            self.usage.reasks += 1
            conv = [*conv, {"role": "assistant", "content": text or ""}, reask_message(problem, schema)]
            rkey = request_key("reask", key, conv)
            hit = self._cache.get(rkey) if self._cache is not None else None
            if hit is not None:
                text = loads(hit).get("text")
                continue
            out = self._generate([item(r, s, conv)])[0]
            if isinstance(out, Exception):
                res.error = f"{kind} {r}, sample {s}: re-ask for valid JSON failed: {type(out).__name__}: {out}"
                res.texts[s] = None
                return
            self.usage.requests += 1
            self.usage.prompt_tokens += out.prompt_tokens
            self.usage.completion_tokens += out.completion_tokens
            text = out.text
            if self._cache is not None:
                self._cache.put(
                    rkey,
                    dumps({"text": text, "finish_reason": out.finish_reason}),
                    kind=kind,
                    model=self.identity().get("model", ""),
                )
        res.error = f"{kind} {r}: sample {s} is not valid for schema {schema.name!r} after {self.max_reasks} re-ask(s): {problem}"
        res.texts[s] = None
