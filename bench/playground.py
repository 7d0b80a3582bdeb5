"""The playground's time to first token on the starter model, once the model is in the playground's cache: how long
after Send the first words of the answer appear, against how long a page that waits for the whole answer would
show nothing (the baseline).

    .venv/bin/python bench/playground.py [--prompts 8] [--max-new-tokens 64]

The model goes through the playground's own cache (lab.playground.cache) and answers through its streaming
function (lab.playground.stream_answer), greedy, so both figures come from the same answers. The goal: the first
token under 1 s on these 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import time

from workspace import fresh

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Explain what a neural network is in one paragraph.", "Write a haiku about autumn.",
           "How do I reverse a list in Python?", "What causes the seasons on Earth?",
           "Suggest a name for a bakery.", "Summarise the plot of Romeo and Juliet in two sentences."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    fresh()
    from lab import playground, registry, settings

    s = settings.load()
    name = registry.ensure_starter(s)["name"]
    t0 = time.perf_counter()
    model, tokenizer = playground.cache().get(s, name)
    loaded = time.perf_counter() - t0
    t0 = time.perf_counter()
    playground.cache().get(s, name)
    cached = time.perf_counter() - t0
    print(f"starter model {name}: first load into the playground's cache {loaded:.1f} s, then {cached * 1000:.2f} ms")
    list(playground.stream_answer(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=4,
                                  temperature=0))  # warm up
    first, whole, tokens = [], [], []
    for prompt in (PROMPTS * 4)[:args.prompts]:
        start = time.perf_counter()
        seen = None
        text = ""
        for text in playground.stream_answer(model, tokenizer, [{"role": "user", "content": prompt}],
                                             max_new_tokens=args.max_new_tokens, temperature=0):
            if seen is None and text.strip():
                seen = time.perf_counter() - start
        whole.append(time.perf_counter() - start)
        first.append(seen if seen is not None else whole[-1])
        tokens.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
        print(f"  first words after {first[-1]:.3f} s, whole answer ({tokens[-1]} tokens) after {whole[-1]:.2f} s: "
              f"{text[:60]!r}")
    print(f"time to first token: median {statistics.median(first):.3f} s, max {max(first):.3f} s (goal under 1 s)")
    print(f"whole answer (what a page without streaming waits): median {statistics.median(whole):.2f} s, "
          f"{sum(tokens) / sum(whole):.1f} tokens/s")
    print(f"ratio {statistics.median(whole) / statistics.median(first):.2f}x")


if __name__ == "__main__":
    main()
