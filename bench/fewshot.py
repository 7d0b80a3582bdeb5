"""Few-shot label scoring: the eval-fewshot plugin's scorer (the prompt runs once, each label continues from its
key/value cache) against one whole forward pass per label, on the starter model.

    .venv/bin/python bench/fewshot.py [--texts 20] [--shots 4]

Data: ../shared/data/classification/sms_spam_train.csv when it is there, else made-up texts. Both scorers see the
same prompts; the bench checks they pick the same labels and prints texts/s side by side and `ratio N.NNx`.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
import time
from pathlib import Path

from workspace import fresh

ROOT = Path(__file__).resolve().parent.parent
SPAM = ROOT.parent / "shared" / "data" / "classification" / "sms_spam_train.csv"
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=20)
    parser.add_argument("--shots", type=int, default=4)
    args = parser.parse_args()
    fresh()
    import torch

    from lab import modeling, registry, settings
    from plugins.eval_fewshot import label_logprobs

    if SPAM.exists():
        with open(SPAM, newline="", encoding="utf-8", errors="replace") as f:
            rows = [{"text": r["text"], "label": r["label"]} for r in csv.DictReader(f)]
    else:
        rows = [{"text": f"message number {i} about {w}", "label": "spam" if i % 3 == 0 else "ham"}
                for i, w in enumerate(["prizes", "lunch", "the bus", "a loan", "football"] * 20)]
    rng = random.Random(0)
    labels = sorted({r["label"] for r in rows})
    s = settings.load()
    info = registry.info(s, registry.ensure_starter(s)["name"])
    model = modeling.causal_lm(info, log=lambda m: None).eval()
    tokenizer = modeling.tokenizer(info["path"], log=lambda m: None)
    header = f"Label each text as one of: {', '.join(labels)}.\n\n"
    prompts = []
    for row in rows[100:100 + args.texts]:
        shots = rng.sample(rows[:100], args.shots)
        prompts.append(header + "".join(f"Text: {x['text']}\nLabel: {x['label']}\n\n" for x in shots)
                       + f"Text: {row['text']}\nLabel:")

    def whole(prompt: str) -> dict[str, float]:
        start = tokenizer(prompt)["input_ids"]
        out = {}
        for label in labels:
            ids = tokenizer(prompt + " " + label)["input_ids"]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            out[label] = sum(logp[i - 1, ids[i]].item() for i in range(len(start), len(ids)))
        return out

    timings, picks = {}, {}
    for name, scorer in (("one forward per label", whole),
                         ("eval-fewshot (cached prompt)", lambda p: label_logprobs(model, tokenizer, p, labels))):
        scorer(prompts[0])  # warm up
        t0 = time.perf_counter()
        scores = [scorer(p) for p in prompts]
        timings[name] = len(prompts) / (time.perf_counter() - t0)
        picks[name] = [max(labels, key=sc.__getitem__) for sc in scores]
    a, b = picks.values()
    print(f"starter model, {len(prompts)} texts, {args.shots} shots, labels {labels}; same labels picked: "
          f"{sum(x == y for x, y in zip(a, b, strict=True))} of {len(a)}")
    for name, rate in timings.items():
        print(f"{name:>30}: {rate:.2f} texts/s")
    base, new = timings.values()
    print(f"ratio {new / base:.2f}x")


if __name__ == "__main__":
    main()
