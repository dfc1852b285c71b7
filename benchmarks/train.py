"""LoRA SFT throughput: thresher's trainer against TRL's SFTTrainer, same model, data, LoRA config and batch.

Each trainer runs in its own subprocess (so peak memory is its own) on the same rows, for the same number of
optimizer steps; the first `--warmup` steps are not timed. Tokens/s counts real (non-pad) tokens, so padding a
trainer does is cost, not throughput. MFU uses the same 4N FLOPs per token for both (N = weights that do a matmul
per token), against the device's peak: the bf16 table entry on a GPU, a measured fp32 matmul peak on a CPU.

"Same batch": TRL takes `--batch` rows per step, padded to the longest; thresher packs rows up to a token budget of
`--batch` x the mean row length, so both see about the same rows and tokens per step.

    python benchmarks/train.py                 # CPU: SmolLM2-135M (the bundled GGUF), a few short steps
    python benchmarks/train.py --size 1b       # CUDA: a Llama-architecture 1.2B with random weights, bf16

On CUDA the model is built from a config with random weights (nothing is downloaded); token lengths are real:
the rows of ../shared/data (LLaMA-Factory's alpaca demo and Cherry's alpaca 5% selection) rendered with the
SmolLM2 chat template.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
SOURCES = [SHARED / "llama-factory-demo" / "alpaca_en_demo.json", SHARED / "cherry-llm" / "cherry_alpaca_5_percent.json"]

# Llama-architecture shapes for the random-weight CUDA models (Llama-3.2-1B and a Qwen2.5-0.5B-sized Llama).
SHAPES: dict[str, dict[str, Any]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["smollm2", *SHAPES], default=None,
                        help="model: smollm2 (the bundled 135M, default on CPU) or a random-weight Llama (default 1b on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (TRL); thresher packs the same tokens")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile thresher's decoder layers")
    parser.add_argument("--trl-padding-free", action="store_true", help="also time TRL with padding_free=True")
    parser.add_argument("--only", choices=["thresher", "trl"], default=None, help="time one trainer only")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per trainer, alternating; the best is reported (default 1 on CUDA, 2 on CPU, "
                        "where other processes share the cores)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", choices=["thresher", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec.read_text())
        result = run_thresher(spec) if args.worker == "thresher" else run_trl(spec)
        Path(spec["result_path"]).write_text(json.dumps(result))
        return

    import torch

    cuda = torch.cuda.is_available()
    size = args.size or ("1b" if cuda else "smollm2")
    defaults = {"steps": 30, "warmup": 5, "batch": 16, "max_seq_len": 1024} if cuda else {
        "steps": 8, "warmup": 2, "batch": 4, "max_seq_len": 128}
    steps, warmup = args.steps or defaults["steps"], args.warmup if args.warmup is not None else defaults["warmup"]
    batch, max_seq_len = args.batch or defaults["batch"], args.max_seq_len or defaults["max_seq_len"]

    with tempfile.TemporaryDirectory(prefix="thresher-bench-train-") as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_model(size, tmp, cuda)
        rows_file, trl_file, mean_len = prepare_rows(model_dir, tmp, rows=steps * batch * 2, max_seq_len=max_seq_len)
        device_name = torch.cuda.get_device_name() if cuda else _cpu_name()
        peak = None if cuda else measure_cpu_peak_tflops()
        base = {
            "model_dir": str(model_dir), "rows_file": str(rows_file), "trl_file": str(trl_file),
            "steps": steps, "warmup": warmup, "batch": batch, "max_seq_len": max_seq_len,
            "micro_batch_tokens": max(max_seq_len, round(batch * mean_len)), "lora_r": args.lora_r,
            "lora_dropout": args.lora_dropout, "gradient_checkpointing": args.gradient_checkpointing,
            "compile": args.compile, "cuda": cuda, "peak_tflops": peak,
        }
        variants = [("thresher", {}), ("trl", {"padding_free": False})]
        if args.trl_padding_free:
            variants.append(("trl", {"padding_free": True}))
        if args.only:
            variants = [v for v in variants if v[0] == args.only]
        runs: list[dict[str, Any]] = []
        for _ in range(args.repeats or (1 if cuda else 2)):
            for worker, extra in variants:
                n = len(runs)
                spec = {**base, **extra, "result_path": str(tmp / f"result-{n}.json"), "out_dir": str(tmp / f"run-{n}")}
                spec_path = tmp / f"spec-{n}.json"
                spec_path.write_text(json.dumps(spec))
                started = time.perf_counter()
                subprocess.run([sys.executable, __file__, "--worker", worker, "--spec", str(spec_path)], check=True)
                result = json.loads(Path(spec["result_path"]).read_text())
                result["wall_s"] = time.perf_counter() - started
                result["tokens_per_s"] = result["tokens"] / result["seconds"]
                runs.append(result)
        if not cuda:  # other processes only ever lower a reading: keep the best from before and after the runs
            base["peak_tflops"] = max(base["peak_tflops"], measure_cpu_peak_tflops())
        best: dict[str, dict[str, Any]] = {}
        for r in runs:
            if r["trainer"] not in best or r["tokens_per_s"] > best[r["trainer"]]["tokens_per_s"]:
                best[r["trainer"]] = r
        report(list(best.values()), runs, size=size, device=device_name, base=base, mean_len=mean_len,
               json_path=args.json)


def build_model(size: str, tmp: Path, cuda: bool) -> Path:
    """The bundled SmolLM2 (converted once into the cache), or a random-weight Llama saved with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from thresher.trainer.model import BUNDLED, load_tokenizer, resolve_model_dir

    smol = resolve_model_dir(BUNDLED)
    if size == "smollm2":
        return smol
    tokenizer = load_tokenizer(smol)
    config = LlamaConfig(**SHAPES[size], max_position_embeddings=8192, rope_theta=500000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    target = tmp / f"llama-{size}-random"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    del model
    return target


def prepare_rows(model_dir: Path, tmp: Path, *, rows: int, max_seq_len: int) -> tuple[Path, Path, float]:
    """The benchmark rows as canonical JSONL (thresher) and TRL prompt/completion JSONL, and their mean length."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from thresher.data import read_records, write_records
    from thresher.trainer.chat import end_of_turn_ids, render_rows, resolve_chat_template
    from thresher.trainer.export import export_dataset
    from thresher.trainer.model import load_tokenizer

    table = pa.concat_tables([read_records(path) for path in SOURCES], promote_options="permissive")
    table = table.filter(pc.is_valid(table["output"])).slice(0, rows)
    rows_file = tmp / "rows.jsonl"
    write_records(table, rows_file)
    trl_file = export_dataset(rows_file, tmp / "trl", target="trl", layout="prompt_completion").files[0]
    tokenizer = load_tokenizer(model_dir)
    examples, _ = render_rows(
        table.to_pylist(), tokenizer, chat_template=resolve_chat_template(tokenizer, None), max_seq_len=max_seq_len,
        eot_ids=end_of_turn_ids(tokenizer, None), on_bad_row="skip",
    )
    return rows_file, trl_file, sum(len(ex) for ex in examples) / len(examples)


def run_thresher(spec: dict[str, Any]) -> dict[str, Any]:
    from thresher.trainer import TrainConfig, train

    cfg = TrainConfig(
        model=spec["model_dir"], dataset=spec["rows_file"], output_dir=spec["out_dir"],
        max_seq_len=spec["max_seq_len"], micro_batch_tokens=spec["micro_batch_tokens"], max_steps=spec["steps"],
        lora_r=spec["lora_r"], lora_alpha=2 * spec["lora_r"], lora_dropout=spec["lora_dropout"],
        learning_rate=1e-4, warmup_ratio=0.0, lr_scheduler="constant", on_bad_row="skip",
        gradient_checkpointing=spec["gradient_checkpointing"], compile=spec["compile"], peak_tflops=spec["peak_tflops"],
        log_every=1, tensorboard=False, progress_bar=False, resume=False,
    )
    result = train(cfg)
    timed = [r for r in result.history if r["kind"] == "train"][spec["warmup"]:]
    seconds = sum(r["seconds"] for r in timed)
    return {
        "trainer": "thresher",
        "tokens": sum(r["tokens"] for r in timed),
        "supervised_tokens": sum(r["supervised_tokens"] for r in timed),
        "seconds": seconds,
        "peak_memory_gb": max(r["peak_memory_gb"] for r in timed),
        "final_loss": timed[-1]["loss"],
        "matmul_params": _matmul_params(spec["model_dir"]),
    }


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from thresher.trainer.metrics import peak_memory_gb
    from thresher.trainer.model import load_tokenizer

    cuda = spec["cuda"]
    device = torch.device("cuda" if cuda else "cpu")
    tokens: list[int] = []
    step_ends: list[float] = []

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_ends.append(now())

    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, attn_implementation="sdpa").to(device)
    tokenizer = load_tokenizer(Path(spec["model_dir"]))
    dataset = datasets.load_dataset("json", data_files=spec["trl_file"], split="train").remove_columns(["id"])
    args = SFTConfig(
        output_dir=spec["out_dir"], max_length=spec["max_seq_len"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, max_steps=spec["steps"], learning_rate=1e-4, lr_scheduler_type="constant",
        warmup_steps=0, logging_steps=1, save_strategy="no", report_to="none", bf16=cuda, seed=0,
        gradient_checkpointing=spec["gradient_checkpointing"], padding_free=spec.get("padding_free", False),
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=not cuda,
    )
    peft_config = LoraConfig(task_type="CAUSAL_LM", r=spec["lora_r"], lora_alpha=2 * spec["lora_r"],
                             lora_dropout=spec["lora_dropout"], target_modules="all-linear")
    trainer = CountingSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[StepClock()])
    start = now()
    output = trainer.train()
    step_ends.insert(0, start)
    warm = spec["warmup"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "trainer": "trl" + (" padding_free" if spec.get("padding_free") else ""),
        "tokens": sum(tokens[warm:]),
        "supervised_tokens": None,
        "seconds": step_ends[-1] - step_ends[warm],
        "peak_memory_gb": peak_memory_gb(device),
        "final_loss": losses[-1] if losses else output.training_loss,
        "matmul_params": _matmul_params(spec["model_dir"]),
    }


def report(results: list[dict[str, Any]], runs: list[dict[str, Any]], *, size: str, device: str,
           base: dict[str, Any], mean_len: float, json_path: Path | None) -> None:
    from thresher.trainer.metrics import PEAK_TFLOPS

    peak = base["peak_tflops"]
    if peak is None and base["cuda"]:
        peak = next((p["bf16"] for k, p in PEAK_TFLOPS.items() if k in device), None)
    print(f"\nLoRA SFT, {size} on {device}; {base['steps']} steps ({base['warmup']} untimed), batch {base['batch']} rows "
          f"~ {base['micro_batch_tokens']} tokens (mean row {mean_len:.0f} tokens, max {base['max_seq_len']}), "
          f"LoRA r={base['lora_r']} all-linear, peak {f'{peak:.3g}' if peak else '?'} TFLOP/s"
          + (" (measured fp32 matmul)" if base["peak_tflops"] else ""))
    print(f"{'trainer':<20}{'tokens/s':>12}{'sup tok/s':>12}{'MFU':>9}{'peak GB':>10}{'loss':>9}{'wall s':>9}")
    if len(runs) > len(results):
        print("best of", len(runs) // len(results), "alternating runs each; all runs (tokens/s):",
              ", ".join(f"{r['trainer']} {r['tokens_per_s']:.1f}" for r in runs))
    for r in results:
        r["supervised_tokens_per_s"] = r["supervised_tokens"] / r["seconds"] if r["supervised_tokens"] else None
        r["mfu"] = 4 * r["matmul_params"] * r["tokens_per_s"] / (peak * 1e12) if peak else None
        sup = f"{r['supervised_tokens_per_s']:.0f}" if r["supervised_tokens_per_s"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['trainer']:<20}{r['tokens_per_s']:>12.1f}{sup:>12}{mfu:>9}{r['peak_memory_gb']:>10.2f}"
              f"{r['final_loss']:>9.3f}{r['wall_s']:>9.1f}")
    ours = next((r for r in results if r["trainer"] == "thresher"), None)
    for r in results:
        if ours is not None and r is not ours:
            print(f"thresher / {r['trainer']}: {ours['tokens_per_s'] / r['tokens_per_s']:.2f}x tokens/s")
    if json_path is not None:
        json_path.write_text(json.dumps({"size": size, "device": device, "config": base, "best": results, "runs": runs},
                                        indent=2))


def measure_cpu_peak_tflops(bursts: int = 10, seconds: float = 0.3) -> float:
    """fp32 matmul throughput of this CPU with torch's threads: the MFU denominator on a CPU.

    The best of several short bursts, since other processes sharing the cores only ever lower a reading.
    """
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(bursts):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * 1024**3 * count / (time.perf_counter() - start) / 1e12)
    return best


def _matmul_params(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from thresher.trainer.model import count_matmul_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return count_matmul_params(model)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    main()
