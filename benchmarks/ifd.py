"""IFD throughput: IFDScorer (batched, sorted by length, the output layer only at answer positions) against the
one-row-at-a-time computation the Cherry LLM scripts do, same rows, model, template and token budget, in one run.

One row at a time (the peer): for each row, the prompt + answer through the model with labels masked to the answer
(transformers' loss over full logits), then the response header + answer the same way; IFD = the ratio of the two
losses. Both sides score the same tokens (the answer cut to what fits in `--max-length` after the prompt), so their
IFDs must agree; the largest difference is printed beside the speeds. The scorer runs with its request cache off.

    python benchmarks/ifd.py                        # CPU: the bundled SmolLM2-135M (GGUF via transformers), fp32
    python benchmarks/ifd.py --model /models/qwen2.5-0.5b-instruct --rows 512 --max-length 512   # CUDA: bf16
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
DATA = SHARED / "cherry-llm" / "cherry_alpaca_5_percent.json"


def one_row_at_a_time(model: Any, tok: Any, texts: list[Any], max_length: int, device: Any) -> list[float]:
    """Cherry's loop: two forward passes per row with transformers' loss over the answer tokens."""
    import torch

    out = []
    for t in texts:
        p_ids = tok(t.prompt, add_special_tokens=False)["input_ids"]
        full = tok(t.prompt + t.answer, add_special_tokens=False)["input_ids"]
        n = min(len(full) - len(p_ids), max_length - len(p_ids))
        h_ids = tok(t.header, add_special_tokens=False)["input_ids"]
        losses = []
        for prefix, ids in ((p_ids, full[: len(p_ids) + n]), (h_ids, h_ids + full[len(p_ids) : len(p_ids) + n])):
            x = torch.tensor([ids], device=device)
            labels = x.clone()
            labels[0, : len(prefix)] = -100
            with torch.inference_mode():
                losses.append(float(model(input_ids=x, labels=labels).loss))
        out.append(losses[0] / losses[1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--rows", type=int, default=None, help="rows scored (default: 32 on CPU, 512 on CUDA)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens of prompt + answer (default: 128 / 512)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--template", choices=["alpaca", "chat"], default="alpaca")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import pyarrow as pa
    import torch

    from thresher.llms.bundled import smollm2_gguf
    from thresher.llms.hf import hf_dir_for_gguf
    from thresher.scorers import IFDScorer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = "bfloat16" if cuda else "float32"
    rows_n = args.rows or (512 if cuda else 32)
    max_length = args.max_length or (512 if cuda else 128)
    model_dir = args.model or str(hf_dir_for_gguf(smollm2_gguf()))
    data = json.loads(DATA.read_text())[:rows_n]
    rows = [{"id": str(i), **r} for i, r in enumerate(data)]

    spec = {"kind": "transformers", "model": model_dir, "dtype": dtype}
    scorer = IFDScorer(backend=spec, template=args.template, max_length=max_length, batch_size=args.batch_size,
                       cache=False)  # fmt: skip
    scorer.load()
    backend = scorer.model()
    warm = scorer.apply(rows[: args.batch_size])  # first-call costs (kernels, allocator) on neither side's clock
    assert warm.failed.num_rows == 0, warm.failed.column("error").to_pylist()[:3]
    t0 = time.perf_counter()
    result = scorer.apply(pa.Table.from_pylist(rows))
    if cuda:
        torch.cuda.synchronize()
    batched_s = time.perf_counter() - t0
    scored = result.output.to_pylist()

    # the same rendered texts for the peer, and the same model object
    from thresher.data.messages import record_messages

    kept = {r["id"] for r in scored}
    chosen = [r for r in rows if r["id"] in kept]
    if args.template == "alpaca":
        texts = scorer._alpaca_texts(chosen)
    else:
        texts = backend.answer_texts([record_messages(r) for r in chosen])
    one_row_at_a_time(backend.model_, backend.tokenizer_, texts[:2], max_length, device)  # warm-up
    t0 = time.perf_counter()
    peer = one_row_at_a_time(backend.model_, backend.tokenizer_, texts, max_length, device)
    if cuda:
        torch.cuda.synchronize()
    one_s = time.perf_counter() - t0

    diff = max(abs(a["ifd"] - b) for a, b in zip(scored, peer, strict=True))
    n = len(scored)
    res = {
        "device": str(device), "dtype": dtype, "model": Path(model_dir).name, "rows": n, "failed": result.failed.num_rows,
        "max_length": max_length, "batch_size": args.batch_size, "template": args.template, "threads": torch.get_num_threads(),
        "batched_rows_per_s": n / batched_s, "one_at_a_time_rows_per_s": n / one_s,
        "ratio": one_s / batched_s, "max_ifd_difference": diff,
    }  # fmt: skip
    print(f"\nIFD, {res['model']} on {device} ({dtype}, {res['threads']} threads), {n} rows of {DATA.name}, "
          f"max_length {max_length}, template {args.template}")  # fmt: skip
    print(f"{'':<24}{'rows/s':>10}{'wall s':>10}")
    print(f"{'IFDScorer (batch ' + str(args.batch_size) + ')':<24}{res['batched_rows_per_s']:>10.2f}{batched_s:>10.1f}")
    print(f"{'one row at a time':<24}{res['one_at_a_time_rows_per_s']:>10.2f}{one_s:>10.1f}")
    print(f"batched / one at a time: {res['ratio']:.2f}x rows/s   (largest IFD difference {diff:.1e})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
