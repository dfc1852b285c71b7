"""LLM client overhead: N chat requests at concurrency C against a server that answers every request after a fixed
latency L (the fault-free `thresher.llms.testing` server, in its own process). The ideal wall time is N / C * L;
everything above it is client work and scheduling.

Clients, each in its own fresh process (distilabel applies nest_asyncio, which patches asyncio process-wide):

- thresher      `OpenAICompatible` (lean transport), request cache off: the client alone
- thresher+cache  the same with the SQLite request cache on (a fresh file): what a pipeline run pays
- openai-sdk    the plain `openai.AsyncOpenAI` client with an asyncio semaphore (DESIGN §8 reference)
- distilabel    distilabel 1.5.3's `OpenAILLM.generate`, one batch of C prompts at a time, as its steps call it

    python benchmarks/llm_client.py                     # 2000 requests, C=64, L=0.2 s, 3 repeats
    python benchmarks/llm_client.py --clients thresher distilabel --repeats 5

Prints the median wall time per client, measured/ideal, CPU per request, and distilabel / thresher.
Needs the `bench` extra for distilabel (`pip install -c constraints.txt distilabel==1.5.3`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CLIENTS = ("thresher", "thresher+cache", "openai-sdk", "distilabel")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _prompts(n: int, tag: str) -> list[str]:
    return [f"benchmark {tag} question {i}" for i in range(n)]


def child(client: str, base_url: str, n: int, c: int, max_tokens: int, tag: str) -> dict[str, Any]:
    """Run one client once; returns wall and CPU seconds (timed around the requests only)."""
    prompts = _prompts(n, tag)
    if client.startswith("thresher"):
        from thresher.llms import OpenAICompatible

        cache: Any = False
        if client == "thresher+cache":
            cache = Path(tempfile.mkdtemp(prefix="thresher-bench-")) / "requests.sqlite"
        b = OpenAICompatible(model="bench", base_url=base_url, max_concurrency=c, cache=cache)
        b.load()
        convs = [[{"role": "user", "content": p}] for p in prompts]
        c0, t0 = _cpu(), time.perf_counter()
        out = b.chat(convs, max_tokens=max_tokens)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        ok = sum(o.ok for o in out)
        b.close()
    elif client == "openai-sdk":
        import openai

        async def run() -> int:
            http = openai.DefaultAsyncHttpxClient(
                limits=__import__("httpx2").Limits(max_connections=c, max_keepalive_connections=c)
            )
            sdk = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, http_client=http)
            sem = asyncio.Semaphore(c)

            async def one(p: str) -> bool:
                async with sem:
                    r = await sdk.chat.completions.create(
                        model="bench", messages=[{"role": "user", "content": p}], max_tokens=max_tokens
                    )
                    return r.choices[0].message.content is not None

            res = await asyncio.gather(*(one(p) for p in prompts))
            await sdk.close()
            return sum(res)

        c0, t0 = _cpu(), time.perf_counter()
        ok = asyncio.run(run())
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    elif client == "distilabel":
        import logging
        import warnings

        warnings.filterwarnings("ignore")
        logging.disable(logging.WARNING)
        from distilabel.models.llms import OpenAILLM

        llm = OpenAILLM(model="bench", base_url=base_url, api_key="bench", max_retries=0)
        llm.load()
        inputs = [[{"role": "user", "content": p}] for p in prompts]
        c0, t0 = _cpu(), time.perf_counter()
        ok = 0
        for i in range(0, n, c):  # a distilabel step hands its LLM one input batch at a time
            for res in llm.generate(inputs=inputs[i : i + c], max_new_tokens=max_tokens):
                ok += res["generations"][0] is not None
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    else:
        raise SystemExit(f"unknown client {client!r}; valid: {CLIENTS}")
    return {"client": client, "wall": wall, "cpu": cpu, "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(args.child, args.base_url, args.requests, args.concurrency, args.max_tokens, args.tag)
        print(json.dumps(res))
        return

    from thresher.llms.testing import FaultServer

    n, c, lat = args.requests, args.concurrency, args.latency
    ideal = n / c * lat
    print(f"{n} requests, max_concurrency {c}, server latency {lat * 1000:.0f} ms: ideal wall time {ideal:.3f} s")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in args.clients}
    with FaultServer(latency=lat) as server:
        for rep in range(args.repeats):
            for client in args.clients:  # interleaved, so background load hits every client alike
                server.reset()
                cmd = [
                    sys.executable, __file__, "--child", client, "--base-url", server.base_url,
                    "--requests", str(n), "--concurrency", str(c), "--max-tokens", str(args.max_tokens),
                    "--tag", f"{client}-{rep}",
                ]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if proc.returncode != 0:
                    print(f"  {client}: failed\n{proc.stderr[-2000:]}")
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                st = server.stats()
                res["server_total"], res["peak"] = st["total"], st["peak_in_flight"]
                results[client].append(res)
                print(
                    f"  run {rep + 1} {client:15s} wall {res['wall']:6.3f} s  ratio {res['wall'] / ideal:5.3f}  "
                    f"cpu/request {res['cpu'] / n * 1000:5.2f} ms  ok {res['ok']}/{n}  peak in flight {res['peak']}"
                )
    print("\nmedian over runs")
    med: dict[str, float] = {}
    for client, runs in results.items():
        if not runs:
            continue
        med[client] = statistics.median(r["wall"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs) / n * 1000
        print(
            f"  {client:15s} {med[client]:6.3f} s   measured/ideal {med[client] / ideal:5.3f}   cpu/request {cpu:5.2f} ms"
        )
    if "thresher" in med:
        goal = "met" if med["thresher"] / ideal <= 1.10 else "NOT met"
        print(f"\nthresher measured/ideal {med['thresher'] / ideal:.3f} (goal <= 1.10: {goal})")
        for peer in ("distilabel", "openai-sdk"):
            if peer in med:
                print(f"{peer} / thresher wall time: {med[peer] / med['thresher']:.2f}x")


if __name__ == "__main__":
    main()
