"""Every number the lab reports, recomputed here the straightforward way and compared (to 1e-3): ROUGE-1, BLEU,
chrF, exact match, accuracy and macro F1, perplexity, few-shot accuracy, preference accuracy and margin."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from test_stages import preference_rows, run_job, spam_rows

from lab import datasets, formats, modeling, registry
from lab.evaluation import classification_scores, text_scores

ANSWERS = ["the cat sat on the mat today", "a dog ran in the park", "birds sing in the morning light"]
REFERENCES = ["the cat sat on the mat", "a dog ran fast in the big park", "birds sing in the morning light"]


def results(job: dict) -> dict:
    return json.loads((Path(job["run_dir"]) / "output" / "results.json").read_text())["results"]


def examples(job: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(job["run_dir"]) / "eval" / "examples.jsonl").open()]


def ngrams(items, n: int) -> Counter:
    return Counter(tuple(items[i:i + n]) for i in range(len(items) - n + 1))


def rouge1_f(answer: str, reference: str) -> float:
    a, r = Counter(answer.split()), Counter(reference.split())
    overlap = sum((a & r).values())
    if not overlap:
        return 0.0
    precision, recall = overlap / sum(a.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(answers: list[str], references: list[str]) -> float:
    """Papineni et al.: clipped n-gram precisions 1..4 summed over the corpus, geometric mean, brevity penalty."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for a, r in zip(answers, references, strict=True):
        a, r = a.split(), r.split()
        hyp_len, ref_len = hyp_len + len(a), ref_len + len(r)
        for n in range(1, 5):
            matches[n - 1] += sum((ngrams(a, n) & ngrams(r, n)).values())
            totals[n - 1] += max(0, len(a) - n + 1)
    assert all(matches), "every order matches somewhere: no smoothing comes into play"
    precision = math.exp(sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / 4)
    penalty = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * penalty * precision


def corpus_chrf(answers: list[str], references: list[str], order: int = 6, beta: float = 2.0) -> float:
    """Popović's chrF: character n-grams 1..6 without spaces, precision and recall averaged over the orders,
    then their F-beta (statistics summed over the corpus)."""
    stats = [[0, 0, 0] for _ in range(order)]  # hyp, ref, match per order
    for a, r in zip(answers, references, strict=True):
        a, r = "".join(a.split()), "".join(r.split())
        for n in range(1, order + 1):
            ha, hr = ngrams(a, n), ngrams(r, n)
            stats[n - 1][0] += sum(ha.values())
            stats[n - 1][1] += sum(hr.values())
            stats[n - 1][2] += sum((ha & hr).values())
    precision = sum(m / h for h, _, m in stats) / order
    recall = sum(m / r for _, r, m in stats) / order
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def test_text_scores_agree_with_the_definitions():
    summary, per = text_scores(ANSWERS, REFERENCES)
    for p, a, r in zip(per, ANSWERS, REFERENCES, strict=True):
        assert p["rouge1"] == pytest.approx(rouge1_f(a, r), abs=1e-3)
        assert p["exact_match"] == float(a == r) and p["contains"] == float(r in a)
    assert summary["rouge1"] == pytest.approx(sum(rouge1_f(a, r) for a, r in zip(ANSWERS, REFERENCES,
                                                                                   strict=True)) / 3, abs=1e-3)
    assert summary["exact_match"] == pytest.approx(1 / 3) and summary["contains"] == pytest.approx(2 / 3)
    assert summary["bleu"] == pytest.approx(corpus_bleu(ANSWERS, REFERENCES), abs=1e-3)
    assert summary["chrf"] == pytest.approx(corpus_chrf(ANSWERS, REFERENCES), abs=1e-3)


def test_classification_scores_agree_with_the_definitions():
    labels = ["ham", "spam", "other"]
    truth = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    predicted = [0, 1, 0, 1, 0, 2, 2, 1, 2, 0]
    found, matrix = classification_scores(labels, truth, predicted)
    assert found["accuracy"] == pytest.approx(sum(t == p for t, p in zip(truth, predicted, strict=True)) / 10)
    f1 = []
    for c in range(3):
        tp = sum(t == c and p == c for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != c and p == c for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == c and p != c for t, p in zip(truth, predicted, strict=True))
        f1.append(2 * tp / (2 * tp + fp + fn))
        assert found[f"precision/{labels[c]}"] == pytest.approx(tp / (tp + fp))
        assert found[f"recall/{labels[c]}"] == pytest.approx(tp / (tp + fn))
    assert found["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert matrix == [[3, 1, 0], [1, 1, 0], [0, 1, 3]]


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    facts = [{"prompt": "Say hello in French.", "completion": "bonjour"},
             {"prompt": "What is the capital of France?", "completion": "Paris"},
             {"prompt": "Count to three.", "completion": "one two three"}]
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", facts))
    datasets.add(ws, "pairs", write_jsonl(tmp_path / "pairs.jsonl", preference_rows(40)))
    datasets.add(ws, "spam", write_jsonl(tmp_path / "spam.jsonl", spam_rows(30)))
    return ws


def test_perplexity_is_the_exponent_of_the_mean_token_loss(lab, tiny_model_dir, jobs_worker):
    found = results(run_job(lab, "eval-perplexity", "tiny", "facts"))
    model = modeling.causal_lm(registry.info(lab, "tiny"), log=lambda m: None).eval()
    tok = modeling.tokenizer(str(tiny_model_dir), log=lambda m: None)
    total = count = 0.0
    for row in datasets.preview(lab, "facts", 10):
        out = tok.apply_chat_template(formats.to_messages("prompt_completion", row)["messages"], tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        total -= sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
        count += len(ids) - 1
    assert found["tokens"] == count
    assert found["loss"] == pytest.approx(total / count, abs=1e-3)
    assert found["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)


def test_zero_shot_accuracy_is_the_share_of_labels_the_model_finds_likeliest(lab, tiny_model_dir, jobs_worker):
    job = run_job(lab, "eval-fewshot", "tiny", "spam", shots="0", limit=12, pool=5)
    found = results(job)
    model = modeling.causal_lm(registry.info(lab, "tiny"), log=lambda m: None).eval()
    tok = modeling.tokenizer(str(tiny_model_dir), log=lambda m: None)
    rows = datasets.preview(lab, "spam", 17)
    tests = rows[5:17]
    labels = sorted({str(r["label"]) for r in rows_all(lab)})

    def logprob(prompt: str, label: str) -> float:
        start, ids = tok(prompt)["input_ids"], tok(prompt + " " + label)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(logp[i - 1, ids[i]].item() for i in range(len(start), len(ids)))

    header = f"Label each text as one of: {', '.join(labels)}.\n\n"
    guesses = [max(labels, key=lambda lab_: logprob(header + f"Text: {r['text']}\nLabel:", lab_)) for r in tests]
    assert [e["predicted"] for e in examples(job)] == guesses
    truth = [str(r["label"]) for r in tests]
    assert found["accuracy_0shot"] == pytest.approx(sum(g == t for g, t in zip(guesses, truth, strict=True)) / 12)
    assert found["majority_baseline"] == pytest.approx(max(truth.count(x) for x in labels) / 12)


def rows_all(s) -> list[dict]:
    return datasets.preview(s, "spam", 1000)


def test_preference_accuracy_and_margin_come_from_the_reward_model_s_own_scores(lab, jobs_worker):
    from transformers import AutoModelForSequenceClassification

    reward = run_job(lab, "reward", "tiny", "pairs", use_lora=False, learning_rate=1e-3, max_steps=10, eval_split=0,
                     precision="fp32")
    job = run_job(lab, "eval-preference", reward["output_model"], "pairs")
    found = results(job)
    path = registry.info(lab, reward["output_model"])["path"]
    tok = modeling.tokenizer(path, log=lambda m: None)
    scorer = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def score(conversation) -> float:
        ids = tok.apply_chat_template(conversation, tokenize=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return scorer(input_ids=ids["input_ids"]).logits[0, 0].item()

    margins = []
    for row in datasets.preview(lab, "pairs", 40):
        pair = formats.to_preference_pair(row)
        margins.append(score(pair["prompt"] + pair["chosen"]) - score(pair["prompt"] + pair["rejected"]))
    assert [e["margin"] for e in examples(job)] == pytest.approx(margins, abs=1e-3)
    assert found["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert found["mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-3)
