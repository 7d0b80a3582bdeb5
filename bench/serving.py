"""Tokens per second of `lab models serve` (continuous batching) with 8 clients at once against the same server
answering the same requests one at a time, on the starter model, through the `openai` client with streaming; with
each request's time to its first token (p50 and p95).

    .venv/bin/python bench/serving.py [--clients 8] [--max-new-tokens 64]

Prompts: the instructions of ../shared/data/sft/alpaca_train.jsonl when it is there, else the lab's demo rows. Greedy
(temperature 0), so both sides write the same answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPACA = ROOT.parent / "shared" / "data" / "sft" / "alpaca_train.jsonl"
DEMO = ROOT / "lab" / "demo" / "instructions.jsonl"


async def ask(client, model: str, prompt: str, max_new_tokens: int) -> tuple[int, float, str]:
    """One streamed answer: (tokens, seconds to the first, text)."""
    began, first, tokens, text = time.perf_counter(), None, 0, []
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_new_tokens, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - began
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - began, "".join(text)


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def measure(url: str, model: str, prompts: list[str], clients: int, max_new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="unused", timeout=600)
    await ask(client, model, prompts[0], 8)  # warm up
    began = time.perf_counter()
    alone = [await ask(client, model, q, max_new_tokens) for q in prompts]
    alone_s = time.perf_counter() - began
    began = time.perf_counter()
    together = await asyncio.gather(*[ask(client, model, q, max_new_tokens) for q in prompts])
    together_s = time.perf_counter() - began
    return {"alone": (alone, alone_s), "together": (together, together_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description="continuous batching: many clients at once against one at a time")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="lab-bench-")
    os.environ.update({"LAB_WORKSPACE": tmp, "LAB_WANDB": "off", "LAB_REPORT_TO": "none"})
    os.environ.pop("LAB_DATABASE_URL", None)
    from lab import registry, settings
    from lab.pgserver import free_port

    s = settings.load()
    model = registry.ensure_starter(s)["name"]
    data = ALPACA if ALPACA.exists() else DEMO
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    prompts = [r["instruction"] for r in rows if not r.get("input")][: args.clients]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = "AVX512-BF16" if "avx512_bf16" in flags else "AVX2" if "avx2" in flags else platform.machine()
    print(f"model {model}, {len(prompts)} prompts from {data.name}, up to {args.max_new_tokens} new tokens, greedy; "
          f"{os.cpu_count()} CPU cores ({cpu})")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lab.cli", "models", "serve", model, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("lab models serve stopped; see the workspace's logs/serve-*.log")
                time.sleep(1)
        found = asyncio.run(measure(url, model, prompts, args.clients, args.max_new_tokens))
    finally:
        server.terminate()
        server.wait(timeout=60)
    rates = {}
    print(f"{'':>22} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'first token p50':>16} {'p95':>6}")
    for side, label in (("alone", "one at a time"), ("together", f"{args.clients} clients at once")):
        answers, seconds = found[side]
        tokens = sum(a[0] for a in answers)
        firsts = [a[1] for a in answers]
        rates[side] = tokens / seconds
        print(f"{label:>22} {tokens:>7} {seconds:>8.1f} {rates[side]:>9.1f} {p(firsts, 50):>15.2f}s "
              f"{p(firsts, 95):>5.2f}s")
    same = sum(a[2] == b[2] for a, b in zip(found["alone"][0], found["together"][0], strict=True))
    print(f"the same answer alone and together: {same} of {len(prompts)}")
    print(f"ratio {rates['together'] / rates['alone']:.2f}x")


if __name__ == "__main__":
    main()
