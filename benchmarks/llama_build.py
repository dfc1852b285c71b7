"""llama.cpp builds: single-stream decode tokens/s of the bundled SmolLM2-135M-Instruct under several interpreters,
each with its own llama-cpp-python build (e.g. the portable one the README installs against a native one in a venv).

Each interpreter runs this file with `--measure` in its own process: it loads the model, then, `--repeats` times,
decodes `--tokens` greedy tokens after a short prompt (prompt processing and the first token are not timed) and
prints its best tokens/s. A build that dies (SIGILL on a CPU it was not built for) is reported as such. The first
interpreter that runs is the reference for the ratios.

    python benchmarks/llama_build.py                                      # this interpreter's build only
    python benchmarks/llama_build.py --python "$(command -v python)" /tmp/venv-native/bin/python

The child needs only llama_cpp (no thresher), so any venv with llama-cpp-python works.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

PROMPT = b"Write a short story about a lighthouse keeper who finds a message in a bottle."


def measure(model: str, threads: int, tokens: int, repeats: int) -> dict[str, object]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT)
    rates = []
    for _ in range(repeats):
        llm.reset()
        start = 0.0
        for n, _tok in enumerate(llm.generate(prompt, temp=0.0), 1):  # greedy; generate() never stops at EOS
            if n == 1:
                start = time.perf_counter()  # the prompt is processed and the first token sampled
            elif n == tokens + 1:
                break
        rates.append(tokens / (time.perf_counter() - start))
    info = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {"version": llama_cpp.__version__, "tokens_per_s": max(rates), "all": rates, "system_info": info}


def run(python: str, model: str, threads: int, tokens: int, repeats: int) -> dict[str, object]:
    args = [python, os.path.abspath(__file__), "--measure", "--model", model, "--threads", str(threads)]
    args += ["--tokens", str(tokens), "--repeats", str(repeats)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode < 0:
        return {"died": signal.Signals(-proc.returncode).name}
    if proc.returncode != 0:
        return {"died": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", nargs="+", default=[sys.executable], help="interpreters, each with its own build")
    ap.add_argument("--model", help="a .gguf file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="LlamaCpp's default")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.model, a.threads, a.tokens, a.repeats)))
        return 0
    if a.model is None:
        from thresher.llms import smollm2_gguf

        a.model = str(smollm2_gguf())
    print(f"{os.path.basename(a.model)}: {a.tokens} tokens, {a.threads} thread(s), best of {a.repeats}")
    ref, ref_py = None, ""
    for py in a.python:
        r = run(py, a.model, a.threads, a.tokens, a.repeats)
        if "died" in r:
            print(f"{py}: died ({r['died']})")
            continue
        rate = float(r["tokens_per_s"])  # type: ignore[arg-type]
        if ref is None:
            ref, ref_py = rate, py
        print(f"{py}: llama-cpp-python {r['version']}: {rate:.1f} tokens/s ({rate / ref:.2f}x {ref_py})")
        print(f"    runs: {', '.join(f'{x:.1f}' for x in r['all'])}; built with: {r['system_info']}")  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
