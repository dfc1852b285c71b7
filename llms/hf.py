"""`Transformers`: a local Hugging Face model for generation and for token log-probabilities of given text (IFD,
DEITA, expected judge scores).

Log-probabilities: each (prefix, continuation) pair is tokenized as the trainer tokenizes a rendered conversation
(`thresher.trainer.chat.encode_rendered`): the joined text without special tokens, the tokenizer's BOS first only
where it adds one and the text lacks it (a chat template that writes its own BOS is never given a second one); the
continuation's tokens are those that start inside it (`thresher.llms.token_scoring.TokenScorer` owns that, the
budgets, the request cache and IFD's passes; this module runs the model). For IFD, `answer_texts` renders a conversation with the chat
template into (prompt, response header, answer) and `answer_logprobs` scores the answer after each, over exactly the
tokens the trainer supervises and with one answer budget. Sequences are sorted by length and batched with right
padding (positions of real tokens are then the same as unbatched, so batched numbers equal one-at-a-time ones); only
the scored positions go through the output layer, one row at a time, so a 49k-token vocabulary never makes a
(batch x length x vocab) tensor. Every answer is kept in the request cache.

GGUF files load through transformers' GGUF support (`from_pretrained(dir, gguf_file=name)`, needs `gguf`), which
de-quantizes every tensor and takes 20-40 s; the result is converted once into
`~/.cache/thresher/hf-from-gguf/<content hash>/` (safetensors) and loaded from there afterwards (~0.2 s).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from thresher.errors import BackendError, ConfigError
from thresher.llms.base import Usage
from thresher.llms.bundled import model_digest, smollm2_gguf
from thresher.llms.cache import RequestCache
from thresher.llms.local import GenItem, GenOut, LocalChatBackend
from thresher.llms.token_scoring import LOGPROBS_VERSION as LOGPROBS_VERSION  # re-exported: older imports
from thresher.llms.token_scoring import AnswerLogprobs as AnswerLogprobs
from thresher.llms.token_scoring import TokenScorer

DTYPES = ("float32", "bfloat16", "float16", "auto")


# Part of every conversion's directory name: bumping it makes conversions done by an older, faulty version of
# hf_dir_for_gguf be redone instead of reused. 2: bos/eos/pad taken from the GGUF file's ids.
CONVERSION_VERSION = 2


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """The from_pretrained keyword for a dtype: transformers >= 4.56 takes `dtype=`, older releases `torch_dtype=`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def conversion_dir() -> Path:
    from thresher.paths import user_cache_dir

    if os.environ.get("THRESHER_MODEL_CACHE"):
        return Path(os.environ["THRESHER_MODEL_CACHE"]).expanduser()
    return user_cache_dir() / "hf-from-gguf"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (two test sessions converting the same GGUF wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no lock, the atomic rename still keeps the result whole
            pass
        yield


def hf_dir_for_gguf(gguf: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A transformers model directory (safetensors) converted from `gguf`, made once and reused."""
    gguf = Path(gguf)
    root = Path(cache_dir) if cache_dir is not None else conversion_dir()
    target = root / f"{gguf.stem}-{model_digest(gguf)}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    with _file_lock(root / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, **dtype_kwarg(torch.float32)
        )
        _special_tokens_from_config(tok, model.config)
        # the weights are plain de-quantized tensors now; drop the GGUF marker that forbids saving
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _special_tokens_from_config(tokenizer: Any, config: Any) -> None:
    """Give the tokenizer the bos/eos/pad tokens the GGUF file names.

    transformers' GGUF tokenizer converter for the llama architecture (4.45 up to 5.17; fixed in 5.18) takes eos from
    the file's bos id and drops pad, so SmolLM2 would end turns with <|im_start|>; the model config, read from the
    same file's tokenizer.ggml.*_token_id fields, has the right ids. A wrong eos stops generation at the wrong token,
    lets the trainer's end-of-turn check pass on it, and is saved with every adapter.
    """
    for name in ("bos", "eos", "pad"):
        tid = getattr(config, f"{name}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(tokenizer) and getattr(tokenizer, f"{name}_token_id") != tid:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(tid))


class Transformers(TokenScorer, LocalChatBackend):
    """A local transformers causal LM: `chat`/`complete`, `logprobs`, `next_token_logprobs`, and IFD's two passes
    over a conversation's answer (`answer_texts`, `answer_logprobs`).

    - model: a .gguf file, a model directory, or a hub id already in the local HF cache (default: the bundled
      SmolLM2-135M-Instruct GGUF). Nothing is downloaded.
    - dtype: "float32" (CPU default), "bfloat16", "float16" or "auto". device: "auto", "cpu", "cuda", "cuda:1"...
    - batch_size: sequences per forward pass. max_length: longest sequence in tokens (longer pairs are cut).
    - convert_dir: where GGUF conversions are kept (default ~/.cache/thresher/hf-from-gguf).
    - adapter: a peft adapter directory (what `thresher train` writes to output_dir/adapter), merged into the base
      model at load: a trained round answers, scores and is judged like any other model. Its content hash joins the
      identity, so a retrained adapter is never answered from the cache of an older one.
    """

    kind = "transformers"

    def __init__(
        self,
        *,
        model: str | os.PathLike[str] | None = None,
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 8,
        max_length: int = 2048,
        max_reasks: int = 2,
        cache: bool | str | os.PathLike[str] | RequestCache = True,
        progress: bool = False,
        convert_dir: str | os.PathLike[str] | None = None,
        adapter: str | os.PathLike[str] | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"Transformers: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if batch_size < 1 or max_length < 2:
            raise ConfigError("Transformers: batch_size must be >= 1 and max_length >= 2")
        self.model = model
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_reasks = max_reasks
        self.cache = cache
        self.progress = progress
        self.convert_dir = convert_dir
        self.adapter = adapter
        self.usage = Usage()
        self.model_: Any = None
        self.tokenizer_: Any = None
        self.device_: Any = None
        self._cache: RequestCache | None = None
        self._ident: dict[str, Any] | None = None

    # ---- identity and loading -------------------------------------------------------------------

    def _source(self) -> tuple[str, Path | None]:
        """(name, local path) of the model; path None for a hub id."""
        if self.model is None:
            p = smollm2_gguf()
            return p.name, p
        p = Path(self.model).expanduser()
        if p.exists():
            return p.name, p
        return str(self.model), None

    def identity(self) -> dict[str, Any]:
        if self._ident is None:
            name, path = self._source()
            self._ident = {
                "kind": self.kind,
                "model": name,
                "digest": model_digest(path) if path is not None else None,
                "dtype": self.dtype,
            }
            if self.adapter is not None:
                self._ident["adapter"] = model_digest(self.adapter)
        return self._ident

    def __repr__(self) -> str:
        return f"Transformers(model={str(self.model) if self.model else 'bundled SmolLM2-135M-Instruct'!r}, dtype={self.dtype!r}, device={self.device!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["model_"], state["tokenizer_"], state["device_"], state["_cache"] = None, None, None, None
        return state

    def model_dir(self) -> str:
        """The directory (or hub id) transformers loads: GGUF files are converted once first."""
        _, path = self._source()
        if path is not None and path.is_file():
            if path.suffix != ".gguf":
                raise ConfigError(f"Transformers: model {path} is a file but not a .gguf; give a model directory")
            return str(hf_dir_for_gguf(path, self.convert_dir))
        return str(path) if path is not None else str(self.model)

    def load(self) -> Transformers:
        if self.model_ is not None:
            return self
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ConfigError("Transformers needs torch and transformers: pip install 'thresher[hf]'") from e
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype: Any = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)
        src = self.model_dir()
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            model: Any = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, **dtype_kwarg(dtype))
        except OSError as e:
            raise BackendError(
                f"Transformers: cannot load {src} (no downloads here; give a local directory): {e}"
            ) from e
        if self.adapter is not None:
            model = _merge_adapter(model, Path(self.adapter).expanduser())
        model.to(device)
        model.eval()
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self.model_, self.tokenizer_, self.device_ = model, tok, torch.device(device)
        self._open_cache()
        return self

    def close(self) -> None:
        self.model_ = self.tokenizer_ = None

    # ---- text helpers ---------------------------------------------------------------------------

    def render(self, conversation: Sequence[Any], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model's chat template writes it (the text `chat` feeds the model)."""
        self.load()
        tok = self.tokenizer_
        if not getattr(tok, "chat_template", None):
            raise ConfigError(f"Transformers: the tokenizer of {self.identity()['model']} has no chat template")
        text: str = tok.apply_chat_template(
            [dict(m) for m in conversation], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    def _scoring_tokenizer(self) -> Any:
        self.load()
        return self.tokenizer_

    def _generation_eos(self) -> list[int]:
        return _as_list(getattr(getattr(self.model_, "generation_config", None), "eos_token_id", None))

    # ---- generation -----------------------------------------------------------------------------

    def _generate(self, items: list[GenItem]) -> list[GenOut | Exception]:
        import torch

        tok, model = self.tokenizer_, self.model_
        prompts = []
        for it in items:
            if it.messages is not None:
                msgs = it.messages
                if it.schema is not None:  # no grammar here: describe the schema; validation and re-asks follow
                    from thresher.llms.structured import schema_instruction

                    msgs = [
                        *msgs[:-1],
                        {**msgs[-1], "content": str(msgs[-1]["content"]) + schema_instruction(it.schema)},
                    ]
                prompts.append(self.render(msgs))
            else:
                prompts.append(it.prompt or "")
        outs: list[GenOut | Exception] = [RuntimeError("not generated")] * len(items)
        # items of one call share their sampling parameters except the seed; group by them anyway
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(repr(sorted((k, v) for k, v in it.sampling.items() if k != "seed")), []).append(i)
        for idx in groups.values():
            smp = dict(items[idx[0]].sampling)
            max_new = int(smp.pop("max_tokens", 256))
            temperature = smp.pop("temperature", None)
            top_p = smp.pop("top_p", None)
            stop = smp.pop("stop", None)
            seed = smp.pop("seed", None)
            kw: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": tok.pad_token_id}
            if temperature is not None and temperature > 0:
                kw.update(do_sample=True, temperature=float(temperature))
                if top_p is not None:
                    kw["top_p"] = float(top_p)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if stop:
                kw.update(stop_strings=[stop] if isinstance(stop, str) else list(stop), tokenizer=tok)
            kw.update(smp)
            order = sorted(idx, key=lambda i: len(prompts[i]))
            for b in range(0, len(order), self.batch_size):
                chunk = order[b : b + self.batch_size]
                try:
                    if seed is not None:
                        torch.manual_seed(int(items[chunk[0]].sampling.get("seed", seed)))
                    tok.padding_side = "left"
                    enc = tok([prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
                    enc = {k: v.to(self.device_) for k, v in enc.items()}
                    with torch.inference_mode():
                        gen = model.generate(**enc, **kw)
                except Exception as e:
                    for i in chunk:
                        outs[i] = e
                    continue
                finally:
                    tok.padding_side = "right"
                width = enc["input_ids"].shape[1]
                eos = set(_as_list(model.generation_config.eos_token_id) + _as_list(tok.eos_token_id))
                for row, i in enumerate(chunk):
                    new = gen[row, width:].tolist()
                    while new and new[-1] == tok.pad_token_id and tok.pad_token_id not in eos:
                        new.pop()
                    ended = bool(new) and new[-1] in eos
                    n_new = len(new)
                    if ended:
                        new = new[:-1]
                    text = tok.decode(new, skip_special_tokens=True)
                    finish = "stop" if ended or n_new < max_new else "length"
                    n_prompt = int(enc["attention_mask"][row].sum())
                    outs[i] = GenOut(text, finish, n_prompt, n_new)
        return outs

    # ---- log-probabilities: the model call (the rest is TokenScorer's) ---------------------------

    def _score_picks(
        self, seqs: list[list[int]], picks: list[list[tuple[int, int]]], desc: str
    ) -> list[list[float] | str]:
        """For each sequence, log p(target | its tokens up to `position`) of each (position, target) pick.

        Sequences are sorted by length and batched with right padding (real tokens keep their unbatched positions,
        so batched numbers equal one-at-a-time ones); only picked positions go through the output layer, one row at
        a time, so a 49k-token vocabulary never makes a (batch x length x vocab) tensor. Sequences with no pick
        are not run.
        """
        import torch

        values: list[list[float] | str] = [[] for _ in seqs]
        order = sorted((i for i in range(len(seqs)) if picks[i]), key=lambda i: len(seqs[i]))
        pad = self.tokenizer_.pad_token_id
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc=desc, unit="seq")
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
                mask[r, : len(seqs[i])] = 1
            ids, mask = ids.to(self.device_), mask.to(self.device_)
            with torch.inference_mode():
                hidden = self._hidden(ids, mask)
                for r, i in enumerate(chunk):
                    positions = sorted({p for p, _ in picks[i]})
                    row_of = {p: k for k, p in enumerate(positions)}
                    logits = self._logits(hidden[r, torch.tensor(positions, device=self.device_)])
                    lp = torch.log_softmax(logits.float(), dim=-1)
                    rows = torch.tensor([row_of[p] for p, _ in picks[i]], device=self.device_)
                    cols = torch.tensor([t for _, t in picks[i]], device=self.device_)
                    values[i] = lp[rows, cols].cpu().tolist()
            self.usage.requests += 1
            self.usage.prompt_tokens += int(mask.sum())
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return values

    def _hidden(self, ids: Any, mask: Any) -> Any:
        """Final hidden states (B, T, H), or full logits when the model has no separable output layer."""
        model = self.model_
        base = getattr(model, "base_model", None)
        head = model.get_output_embeddings()
        if base is not None and base is not model and head is not None:
            self._full_logits = False
            return base(input_ids=ids, attention_mask=mask).last_hidden_state
        self._full_logits = True
        return model(input_ids=ids, attention_mask=mask).logits

    def _logits(self, hidden: Any) -> Any:
        if self._full_logits:
            return hidden
        model = self.model_
        logits = model.get_output_embeddings()(hidden)
        cfg = model.config
        scale = getattr(cfg, "logit_scale", None)
        if scale:
            logits = logits * scale
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            import torch

            logits = torch.tanh(logits / cap) * cap
        return logits


def _merge_adapter(model: Any, adapter: Path) -> Any:
    """The base model with a peft adapter's weights merged in (no peft layers left at inference)."""
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"Transformers: adapter {adapter} has no adapter_config.json (give output_dir/adapter)")
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ConfigError("Transformers: adapter= needs peft: pip install 'thresher[train]'") from e
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, (list, tuple)) else [int(x)]
