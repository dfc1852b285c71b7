"""Continuous batching for the embedded llama.cpp model: several conversations decoded together in one context.

One llama.cpp decode call costs about the same for 1 token as for 8 on a small model (the weights are read once
either way), so answering one request at a time leaves most of a CPU's throughput unused. `BatchedDecoder` keeps up
to `n_parallel` sequences live in one context, each with its own sequence id, positions and sampler chain, and every
step decodes one batch that holds the next token of each generating sequence plus a chunk of the prompts still being
read in. A finished sequence leaves and a waiting one takes its slot at the next step, so
the slots stay full however the requests arrive (continuous batching, as llama.cpp's own server does it).

A slot keeps the KV of the tokens it last held when its sequence leaves. A prompt that begins like something already
in the context is read from where they part: from its own slot's cache, or, when another slot shares a longer
beginning, from a copy of that slot's cells (a memory copy, far cheaper than reading the tokens again). Instruction
data is full of such prompts: a judge's or a classifier's long instructions before each row, a system prompt, the
turns of a conversation. llama-cpp-python's one-at-a-time path and llama.cpp's server reuse prefixes the same way.

It runs on one background thread that owns the context; any number of threads `submit` requests and wait on
futures. Sampling follows llama-cpp-python's high-level API (same defaults, same chain order: penalties, logit bias,
grammar, then greedy at temperature 0 or top-k → typical → top-p → min-p → temperature → seeded draw), so a request
gets the same text batched or alone, up to the rounding of batched matmuls (see the backend's README section).
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import ctypes
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from thresher.errors import BackendError
from thresher.llms.cpu_threads import ThreadTuner, usable_cores


@dataclass
class Sampling:
    """Sampling parameters of one sequence; the defaults are llama-cpp-python's chat defaults."""

    temperature: float = 0.2
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] | None = None


@dataclass
class SeqRequest:
    """One sequence to generate: its prompt tokens and how to stop.

    - max_tokens: None or <= 0 generates until a stop or the end of the sequence's context.
    - stop: strings that end the text (not included in it).
    - grammar: a `llama_cpp.LlamaGrammar` (structured output), or None.
    - top_logprobs: None for no log-probabilities, else how many alternatives to keep per token (0: the chosen only).
    """

    tokens: list[int]
    max_tokens: int | None = 256
    stop: Sequence[str] = ()
    sampling: Sampling = field(default_factory=Sampling)
    grammar: Any = None
    top_logprobs: int | None = None


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class SeqResult:
    text: str
    finish_reason: str  # "stop" (end-of-generation token or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None


class _Seq:
    """A request while it lives in the decoder: its slot, position and text so far."""

    __slots__ = ("fed", "future", "generated", "logprobs", "next_token", "pos", "req", "sampler", "sid", "text",
                 "utf8")  # fmt: skip

    def __init__(self, req: SeqRequest, future: Future[SeqResult]) -> None:
        self.req, self.future = req, future
        self.sid = -1
        self.fed = 0  # prompt tokens already decoded
        self.pos = 0  # position of the next token fed
        self.next_token: int | None = None  # sampled, not yet fed
        self.generated = 0
        self.text = ""
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.logprobs: list[TokenLogprob] | None = [] if req.top_logprobs is not None else None
        self.sampler: Any = None


class BatchedDecoder:
    """Decodes up to `n_parallel` sequences together in a context of its own on `llama`'s weights.

    - llama: a loaded `llama_cpp.Llama` (its model and vocabulary are shared, its context is not used).
    - n_parallel: sequences decoded together (slots).
    - n_ctx: context window of each sequence (prompt + completion); the context holds n_ctx × n_parallel cells.
    - n_batch: most tokens in one decode call (generating sequences first, then prompt chunks).
    - n_threads, n_threads_batch: CPU threads for token generation and for prompt processing. Both None: chosen
      while decoding by `cpu_threads.ThreadTuner`, between 1 and the usable cores, by measured speed; one given:
      both fixed at it.
    - reuse_prefix: read a prompt from where it parts from the tokens already in the context (see the module's
      docstring); False reads every prompt whole.
    """

    def __init__(
        self,
        llama: Any,
        *,
        n_parallel: int,
        n_ctx: int,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        reuse_prefix: bool = True,
    ) -> None:
        import llama_cpp

        self._lc = llama_cpp
        self._llama = llama
        self.n_parallel, self.n_ctx, self.n_batch = int(n_parallel), int(n_ctx), int(max(n_batch, n_parallel, 2))
        model = llama._model
        self._model = model
        self._vocab = model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        params = llama_cpp.llama_context_params.from_buffer_copy(llama.context_params)
        params.n_ctx = self.n_ctx * self.n_parallel
        params.n_seq_max = self.n_parallel
        params.n_batch = params.n_ubatch = self.n_batch
        # llama.cpp uses n_threads for a batch of one token and n_threads_batch for more: a step of several
        # generating sequences runs on n_threads_batch, so the tuner sets both
        self.tuner: ThreadTuner | None = None
        if n_threads is None and n_threads_batch is None:
            self.tuner = ThreadTuner(usable_cores())
            threads = threads_batch = self.tuner.current
        else:
            threads = int(n_threads or n_threads_batch)  # type: ignore[arg-type]
            threads_batch = int(n_threads_batch or n_threads)  # type: ignore[arg-type]
        params.n_threads, params.n_threads_batch = threads, threads_batch
        self.threads = threads
        # a KV stream per sequence: with one shared pool a sequence's attention spans the others' (masked) cells
        # too, and sums over a different length round differently than the same sequence decoded alone
        params.kv_unified = False
        params.embeddings = False
        # no flash attention (llama-cpp-python's default too). It would save 16% a step for 8 sequences over 256
        # tokens, but llama.cpp's CPU kernel (ggml-cpu ops.cpp, flash_attn_ext_f16) turns tiled from 64 queries a
        # call, accumulates softmax(KQ)·V in F16 when the cache is F16, and for a lone sequence with 512 cells or
        # more splits the cells into one slice per thread: measured, a sequence's later tokens came out differently
        # after a reused prefix; an answer would depend on the thread count and on what ran beside it
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = llama_cpp.llama_init_from_model(model.model, params)
        if ctx is None:
            raise BackendError(
                f"LlamaCpp: cannot make a context of {params.n_ctx} tokens for {self.n_parallel} sequences; "
                "lower n_parallel or n_ctx"
            )
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._pieces: dict[int, bytes] = {}
        self._piece_buf = ctypes.create_string_buffer(256)
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._active: list[_Seq] = []
        self._free_ids = list(range(self.n_parallel - 1, -1, -1))
        self.reuse_prefix = bool(reuse_prefix)
        # the tokens whose KV each slot holds, at positions 0.. (kept after its sequence leaves, for reuse)
        self._held: list[list[int]] = [[] for _ in range(self.n_parallel)]
        self.reused_tokens = 0  # prompt tokens not read again thanks to reuse, for tests and benchmarks
        # a shared beginning shorter than this is read again rather than copied from another slot: the copy moves
        # the whole stream (n_ctx cells), measured on SmolLM2 at 6.5 ms for 2,048 cells and 12.5 ms for 4,096,
        # where reading a prompt token costs 5-13 ms
        self.min_copy_gain = max(4, self.n_ctx // 512)
        self._closing = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode calls, for tests and benchmarks
        self.peak_live = 0  # most sequences live at once
        self.moves = 0  # sequences moved to a lower slot to close a gap (see _close_gaps)
        # the model must outlive this context, and the thread must stop before either is freed
        _LIVE.add(self)

    # ---- public -------------------------------------------------------------------------------------

    def submit(self, req: SeqRequest) -> Future[SeqResult]:
        fut: Future[SeqResult] = Future()
        if not req.tokens:
            fut.set_exception(ValueError("empty prompt: nothing to decode"))
            return fut
        if len(req.tokens) >= self.n_ctx:
            fut.set_exception(
                ValueError(f"Requested tokens ({len(req.tokens)}) exceed context window of {self.n_ctx}")
            )
            return fut
        with self._cv:
            if self._closing:
                raise BackendError("LlamaCpp: the batched decoder is closed")
            self._waiting.append(_Seq(req, fut))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="thresher-llamacpp-decoder", daemon=True)
                self._thread.start()
            self._cv.notify()
        return fut

    def generate(self, reqs: Sequence[SeqRequest]) -> list[SeqResult | Exception]:
        """Submit all and wait: one result or exception per request, in order."""
        futs = [self.submit(r) for r in reqs]
        out: list[SeqResult | Exception] = []
        for f in futs:
            try:
                out.append(f.result())
            except Exception as e:
                out.append(e)
        return out

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._lc.llama_free(self._ctx)
            self._ctx = None
        _LIVE.discard(self)

    # ---- the decoding thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._waiting and not self._active:
                    self._cv.wait()
                if self._closing:
                    err = BackendError("LlamaCpp: the batched decoder closed before this request finished")
                    for seq in [*self._active, *self._waiting]:
                        self._finish_error(seq, err)
                    self._waiting.clear()
                    self._active.clear()
                    return
                while self._waiting and self._free_ids:
                    seq = self._waiting.popleft()
                    if not seq.future.set_running_or_notify_cancel():
                        continue
                    try:
                        seq.sampler = self._make_sampler(seq.req)
                    except Exception as e:
                        seq.future.set_exception(e)
                        continue
                    seq.sid = self._take_slot(seq.req.tokens)
                    self._active.append(seq)
            if self._active:
                self.peak_live = max(self.peak_live, len(self._active))
                try:
                    self._step()
                except Exception as e:  # a failed decode fails the sequences in it, not the decoder
                    for seq in list(self._active):
                        self._finish_error(seq, e)

    def _step(self) -> None:
        """One prompt chunk (of the oldest sequence still reading its prompt), then one token of every generating
        sequence. Prompts are decoded alone, in the chunks llama-cpp-python uses, and generating tokens only with
        each other: llama.cpp splits a batch that mixes them into uneven pieces whose matmuls round differently,
        and a sequence's text would then depend on what else was in flight.

        Nor is a prompt ever read one token at a time (unless it is one token long): llama.cpp computes attention
        for a single query on another path than for several, and the two round differently. Measured on
        SmolLM2-135M: a 513-token prompt read as 512 + 1 tokens chose another first token than the same prompt read
        as 450 + 63, while chunks of two or more tokens, of any size, gave bit-identical logits. So a prompt's
        logits depend neither on its chunks nor on how much of it was reused, and a request gets the same answer
        whatever ran before it."""
        prefilling = next((q for q in self._active if q.fed < len(q.req.tokens)), None)
        generating = [q for q in self._active if q.next_token is not None]
        if prefilling is not None:
            seq = prefilling
            prompt = seq.req.tokens
            if seq.fed == 0:
                self._start_prompt(seq)
            n = min(self.n_batch, len(prompt) - seq.fed)
            if len(prompt) - seq.fed - n == 1:
                n -= 1  # never leave one token to read alone (see above)
            chunk = prompt[seq.fed : seq.fed + n]
            done = seq.fed + len(chunk) == len(prompt)
            for j, tok in enumerate(chunk):
                self._put(j, tok, seq.pos + j, seq.sid, done and j == len(chunk) - 1)
            self._decode(len(chunk))
            self._held[seq.sid].extend(chunk)
            seq.fed += len(chunk)
            seq.pos += len(chunk)
            if done:
                self._take_token(seq, len(chunk) - 1)
        if generating:
            self._close_gaps(generating)
            # by slot: llama.cpp splits a batch into one piece per run of consecutive sequence ids, in batch order
            generating.sort(key=lambda q: q.sid)
            for j, seq in enumerate(generating):
                self._put(j, seq.next_token, seq.pos, seq.sid, True)  # type: ignore[arg-type]
            self._decode(len(generating), generating=True)
            for j, seq in enumerate(generating):
                self._held[seq.sid].append(seq.next_token)  # type: ignore[arg-type]
                seq.pos += 1
                seq.next_token = None
                self._take_token(seq, j)

    def _close_gaps(self, generating: list[_Seq]) -> None:
        """Moves generating sequences from the top slots down into free ones, so the live sequences hold slots
        0..live-1. llama.cpp (one KV stream per sequence) decodes a batch as one piece per run of consecutive
        sequence ids: measured on SmolLM2, 8 sequences on slots 0-7 took 48-52 ms a step, with one gap (0-3, 5-8)
        64-67 ms, on every other slot of 16 133 ms, as 8 single-token decodes. Sequences finish in any order, so gaps
        open all the time. A move is a copy of the stream (6.5 ms for 2,048 cells), paid once, where a gap costs
        ~15 ms every step; the KV is copied exactly, so the sequence's tokens do not change."""
        live = len(self._active)
        holes = sorted(s for s in self._free_ids if s < live)
        if not holes:
            return
        movers = sorted((q for q in generating if q.sid >= live), key=lambda q: -q.sid)
        for seq, hole in zip(movers, holes, strict=False):  # fewer holes than movers: the rest stay
            src = seq.sid
            self._lc.llama_memory_seq_rm(self._mem, hole, -1, -1)
            self._lc.llama_memory_seq_cp(self._mem, src, hole, -1, -1)  # done before the next decode
            self._held[hole] = list(self._held[src])  # src keeps its cells and tokens too: free, for reuse
            self._free_ids.remove(hole)
            self._free_ids.append(src)
            seq.sid = hole
            self.moves += 1

    def _take_slot(self, prompt: list[int]) -> int:
        """The free slot whose held tokens share the longest beginning with `prompt` (without reuse, or on a tie,
        the lowest: live sequences then stay on consecutive slots, see _close_gaps)."""
        free = self._free_ids
        shared = (lambda i: _common_prefix(self._held[free[i]], prompt)) if self.reuse_prefix else (lambda i: 0)
        best = max(range(len(free)), key=lambda i: (shared(i), -free[i]))
        free[best], free[-1] = free[-1], free[best]
        return free.pop()

    def _start_prompt(self, seq: _Seq) -> None:
        """Drop what the slot holds past the prompt's shared beginning, copying a longer one from another slot
        first if one has it; the prompt is then read from there. Decided when the prompt's turn to be read
        comes, not when it takes its slot, so requests that arrive together reuse the first one's reading."""
        sid, prompt = seq.sid, seq.req.tokens
        keep = 0
        if self.reuse_prefix:
            keep = _common_prefix(self._held[sid], prompt)
            donor, donor_keep = -1, 0
            for other, held in enumerate(self._held):
                if other != sid:
                    n = _common_prefix(held, prompt)
                    if n > donor_keep:
                        donor, donor_keep = other, n
            # at least the last two prompt tokens are read: the last one's logits choose the first token, and
            # one token read alone would round differently (see _step)
            limit = max(len(prompt) - 2, 0)
            keep, donor_keep = min(keep, limit), min(donor_keep, limit)
            if donor >= 0 and donor_keep >= keep + self.min_copy_gain:
                # copies the donor's whole stream at the next decode (llama.cpp copies across streams only whole)
                self._lc.llama_memory_seq_cp(self._mem, donor, sid, -1, -1)
                self._held[sid] = list(self._held[donor])
                keep = donor_keep
        if not self._lc.llama_memory_seq_rm(self._mem, sid, keep, -1):
            self._lc.llama_memory_seq_rm(self._mem, sid, -1, -1)
            keep = 0
        del self._held[sid][keep:]
        self.reused_tokens += keep
        seq.fed = seq.pos = keep

    def _put(self, j: int, token: int, pos: int, sid: int, logits: bool) -> None:
        b = self._batch
        b.token[j] = token
        b.pos[j] = pos
        b.n_seq_id[j] = 1
        b.seq_id[j][0] = sid
        b.logits[j] = 1 if logits else 0

    def _decode(self, n: int, *, generating: bool = False) -> None:
        tuner, threads = self.tuner, self.threads
        if tuner is not None:
            # trials on generation steps only: same-sized, back to back, so they compare
            threads = tuner.threads(n) if generating else tuner.current
            if threads != self.threads:
                self._lc.llama_set_n_threads(self._ctx, threads, threads)
                self.threads = threads
        self._batch.n_tokens = n
        t0 = time.perf_counter()
        rc = self._lc.llama_decode(self._ctx, self._batch)
        if tuner is not None and generating and rc == 0:
            tuner.record(threads, n, time.perf_counter() - t0)
        self.steps += 1
        if rc != 0:
            raise BackendError(f"llama_decode returned {rc} for a batch of {n} tokens ({len(self._active)} sequences)")

    def _take_token(self, seq: _Seq, i: int) -> None:
        lc = self._lc
        tok = int(lc.llama_sampler_sample(seq.sampler.sampler, self._ctx, i))
        if seq.logprobs is not None:
            seq.logprobs.append(self._logprob(i, tok, seq.req.top_logprobs or 0))
        if lc.llama_vocab_is_eog(self._vocab, tok):
            self._finish(seq, "stop")
            return
        seq.generated += 1
        before = len(seq.text)
        seq.text += seq.utf8.decode(self._piece(tok))
        stops = seq.req.stop
        if stops:
            cut = -1
            for s in stops:
                if not s:
                    continue
                k = seq.text.find(s, max(0, before - len(s) + 1))
                if k >= 0 and (cut < 0 or k < cut):
                    cut = k
            if cut >= 0:
                seq.text = seq.text[:cut]
                self._finish(seq, "stop")
                return
        mt = seq.req.max_tokens or 0  # None or <= 0: no limit
        # a character cut in the middle of its UTF-8 bytes (CJK text: 3 bytes, often a token each) is finished
        # first, as llama-cpp-python's one-at-a-time path does: up to 3 tokens past max_tokens, never past the context
        mid_char = bool(seq.utf8.getstate()[0]) and seq.generated < mt + 3
        if (0 < mt <= seq.generated and not mid_char) or seq.pos >= self.n_ctx:
            self._finish(seq, "length")
            return
        seq.next_token = tok

    def _logprob(self, i: int, tok: int, top: int) -> TokenLogprob:
        import numpy as np

        ptr = self._lc.llama_get_logits_ith(self._ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        mx = logits.max()
        lse = mx + np.log(np.exp(logits - mx).sum())
        alts: list[tuple[str, float]] = []
        if top > 0:
            idx = np.argpartition(-logits, top)[:top]
            idx = idx[np.argsort(-logits[idx])]
            alts = [(self._piece_text(int(t)), float(logits[t] - lse)) for t in idx]
        return TokenLogprob(self._piece_text(tok), float(logits[tok] - lse), alts)

    def _piece(self, tok: int) -> bytes:
        p = self._pieces.get(tok)
        if p is None:
            n = self._lc.llama_token_to_piece(self._vocab, tok, self._piece_buf, len(self._piece_buf), 0, False)
            p = bytes(self._piece_buf.raw[: max(n, 0)])
            self._pieces[tok] = p
        return p

    def _piece_text(self, tok: int) -> str:
        return self._piece(tok).decode("utf-8", errors="replace")

    def _make_sampler(self, req: SeqRequest) -> Any:
        from llama_cpp import _internals

        s = req.sampling
        smp = _internals.LlamaSampler()
        if s.repeat_penalty != 1.0 or s.frequency_penalty != 0.0 or s.presence_penalty != 0.0:
            smp.add_penalties(self.n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty)
        if s.logit_bias:
            smp.add_logit_bias(self.n_vocab, {int(k): float(v) for k, v in s.logit_bias.items()})
        if req.grammar is not None:
            smp.add_grammar(self._model, req.grammar)
        if s.temperature == 0.0:
            smp.add_greedy()
        else:
            smp.add_top_k(int(s.top_k))
            smp.add_typical(float(s.typical_p), 1)
            smp.add_top_p(float(s.top_p), 1)
            smp.add_min_p(float(s.min_p), 1)
            smp.add_temp(float(s.temperature))
            smp.add_dist(int(s.seed) & 0xFFFFFFFF if s.seed is not None else self._lc.LLAMA_DEFAULT_SEED)
        return smp

    def _release(self, seq: _Seq, *, keep: bool = True) -> None:
        if seq.sid >= 0:
            if not (keep and self.reuse_prefix):
                self._lc.llama_memory_seq_rm(self._mem, seq.sid, -1, -1)
                self._held[seq.sid] = []
            self._free_ids.append(seq.sid)
            seq.sid = -1
        if seq in self._active:
            self._active.remove(seq)
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None

    def _finish(self, seq: _Seq, reason: str) -> None:
        # the bytes of a character left incomplete (the context ran out mid-character) are dropped, not shown as U+FFFD
        self._release(seq)
        seq.future.set_result(
            SeqResult(seq.text, reason, len(seq.req.tokens), seq.generated, seq.logprobs)
        )

    def _finish_error(self, seq: _Seq, err: Exception) -> None:
        self._release(seq, keep=False)  # a failed decode leaves the slot's cells in no known state
        if not seq.future.done():
            seq.future.set_exception(err)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_LIVE: weakref.WeakSet[BatchedDecoder] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # stop decoding threads before the interpreter frees the models under them
    for dec in list(_LIVE):
        with contextlib.suppress(Exception):
            dec.close()
