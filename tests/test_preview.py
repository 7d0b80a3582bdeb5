"""The "as the model sees it" preview is the training code: for every format sft takes, with and without
completion_only, for tokenizers with and without a chat template, the preview's trained tokens are exactly the
labels the trainer's collator hands to the model; rows that truncation leaves without a trained token are named
before launch, and a dataset where every row loses them is refused."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import write_jsonl

from lab import datasets, modeling, preview, registry, runs
from lab.errors import LabError

ROWS = {
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                           {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "It is 4."}]},
             {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]}],
    "alpaca": [{"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hello", "input": "", "output": "Hello, world."}],
    "prompt_completion": [{"prompt": "The capital of France is", "completion": " Paris."},
                          {"prompt": "Two plus two is", "completion": " four."}],
}
ZEPHYR = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(params=["chatml", "zephyr", "none"])
def tokenizer_dir(request, tiny_model_dir, tmp_path):
    """The tiny model's tokenizer with its ChatML template, another template, or none (the lab falls back)."""
    folder = tmp_path / request.param
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config.pop("chat_template", None)
    if request.param != "none":
        config["chat_template"] = ZEPHYR if request.param == "zephyr" else modeling.CHATML_TEMPLATE
    config_path.write_text(json.dumps(config))
    return folder


def trained_by_the_trainer(folder, fmt, rows, completion_only, max_length):
    """Per input row: the (input_ids, labels) the SFT trainer's collator gives the model, as the sft plugin builds
    the trainer; None for a row the trainer dropped."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = modeling.tokenizer(str(folder), log=lambda m: None)
    data = Dataset.from_list([{**preview.sft_example(fmt, r, completion_only), "lab_row": i}
                              for i, r in enumerate(rows)])
    args = SFTConfig(output_dir=str(folder / "out"), use_cpu=True, report_to=[], max_length=max_length,
                     completion_only_loss=True if completion_only else None, remove_unused_columns=False)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), args=args,
                         train_dataset=data, processing_class=tok)
    out = [None] * len(rows)
    for example in trainer.train_dataset:
        batch = trainer.data_collator([{k: example[k] for k in ("input_ids", "labels")}])
        out[example["lab_row"]] = (batch["input_ids"][0].tolist(), batch["labels"][0].tolist())
    return out


@pytest.mark.parametrize("completion_only", [True, False])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_the_preview_shows_exactly_the_tokens_training_learns(tokenizer_dir, fmt, completion_only):
    rows = ROWS[fmt]
    expected = trained_by_the_trainer(tokenizer_dir, fmt, rows, completion_only, max_length=1024)
    tok = modeling.tokenizer(str(tokenizer_dir), log=lambda m: None)
    for row, (ids, labels) in zip(rows, expected, strict=True):
        shown = preview.tokenize_row(str(tokenizer_dir), fmt, row, completion_only)
        assert [piece for piece, _ in shown["tokens"]] == [tok.decode([i]) for i in ids]
        assert [state == "train" for _, state in shown["tokens"]] == [label != -100 for label in labels]
        if completion_only:  # the prompt is masked, the reply is learned
            assert 0 < shown["trained"] < shown["count"]
        else:
            assert shown["trained"] == shown["count"]


def test_rows_truncated_to_nothing_are_named_as_the_trainer_drops_them(tiny_model_dir):
    rows = [{"prompt": "word " * n, "completion": " end."} for n in (2, 40, 3, 60)]
    expected = trained_by_the_trainer(tiny_model_dir, "prompt_completion", rows, True, max_length=24)
    assert [e is None for e in expected] == [False, True, False, True], "the trainer drops the two long rows"
    for row, kept in zip(rows, expected, strict=True):
        shown = preview.tokenize_row(str(tiny_model_dir), "prompt_completion", row, True, max_length=24)
        seen = [state != "cut" for _, state in shown["tokens"]]
        if kept is None:
            assert shown["trained"] == 0 and shown["cut"] > 0
            assert "No token of this row is trained" in preview.sample_html(shown)
        else:
            assert sum(seen) == len(kept[0]) and shown["trained"] == sum(label != -100 for label in kept[1])


def test_the_train_page_counts_the_rows_lost_and_a_dataset_lost_entirely_is_refused(ws, tiny_model_dir, tmp_path):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    rows = [{"prompt": "word " * n, "completion": " end."} for n in (2, 40, 3, 60, 80)]
    datasets.add(ws, "long", write_jsonl(tmp_path / "long.jsonl", rows))
    found = preview.truncation(ws, "tiny", "long", {"max_length": 24, "completion_only": True})
    assert (found["lost"], found["checked"], found["first_lost"]) == (3, 5, [1, 3, 4])
    assert preview.truncation(ws, "tiny", "long", {"max_length": 1024, "completion_only": True})["lost"] == 0

    datasets.add(ws, "too-long", write_jsonl(tmp_path / "too-long.jsonl", rows[1::2]))
    with pytest.raises(LabError, match="every row of too-long loses all its trained tokens to max_length=24"):
        runs.submit(ws, "sft", model="tiny", dataset="too-long", params={"max_length": "24"})
    assert runs.list_jobs(ws) == []
    runs.submit(ws, "sft", model="tiny", dataset="too-long", params={"max_length": "24", "completion_only": "false"})


@pytest.mark.parametrize(("method", "side"), [("dpo", "prompt"), ("kto", "prompt"), ("reward", "chosen"),
                                             ("orpo", "chosen")])
def test_the_train_page_counts_the_pairs_each_method_loses_and_refuses_a_dataset_lost_entirely(
        ws, tiny_model_dir, tmp_path, method, side):
    """The pairs each preference trainer's own preparation drops (or, for orpo, cuts to an empty answer) at
    max_length: the even rows here, as the same rows at run time (test_diagnosis)."""
    from test_diagnosis import long_pairs

    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "half", write_jsonl(tmp_path / "half.jsonl", long_pairs(f"half-{side}", 8)))
    found = preview.truncation(ws, "tiny", "half", {"max_length": 64}, method=method)
    assert (found["lost"], found["checked"], found["first_lost"], found["unit"]) == (4, 8, [0, 2, 4, 6], "pairs")
    assert preview.truncation(ws, "tiny", "half", {"max_length": 4096}, method=method)["lost"] == 0

    datasets.add(ws, "all", write_jsonl(tmp_path / "all.jsonl", long_pairs(side, 4)))
    with pytest.raises(LabError, match="every pair of all loses all its trained tokens to max_length=64"):
        runs.submit(ws, method, model="tiny", dataset="all", params={"max_length": "64"})
    assert runs.list_jobs(ws) == []
    runs.submit(ws, method, model="tiny", dataset="all", params={"max_length": "4096"})


@pytest.mark.parametrize("cut", [False, True])
def test_the_preference_preview_is_what_dpo_trains_on(tokenizer_dir, cut):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from lab import formats

    row = {"prompt": "How do I boil an egg? Please explain the steps.", "chosen": "Put it in boiling water for "
           "seven minutes.", "rejected": "No."}
    tok = modeling.tokenizer(str(tokenizer_dir), log=lambda m: None)
    prompt = tok.apply_chat_template(formats.to_preference_pair(row)["prompt"], add_generation_prompt=True)
    max_length = len(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) + 3 if cut else None
    args = DPOConfig(output_dir=str(tokenizer_dir / "out"), use_cpu=True, report_to=[], max_length=max_length)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tokenizer_dir, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list([formats.to_preference_pair(row)]), processing_class=tok)
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
    shown = preview.preference_row(str(tokenizer_dir), row, max_length)
    for i, side in enumerate(("chosen", "rejected")):
        kept = int(batch["attention_mask"][i].sum())
        seen = [(piece, state) for piece, state in shown[side]["tokens"] if state != "cut"]
        assert [p for p, _ in seen] == [tok.decode([t]) for t in batch["input_ids"][i][:kept].tolist()]
        assert [s == "train" for _, s in seen] == [bool(m) for m in batch["completion_mask"][i][:kept].tolist()]
        assert shown[side]["trained"] > 0 and (shown[side]["cut"] > 0) == (max_length is not None)


def test_previews_and_checks_in_several_server_threads_at_once_find_trl(tiny_model_dir):
    """The web server runs handlers in threads: some that need TRL, a tokenizer and a model at the same moment, in
    a fresh process (without the import lock this fails nearly every time: "cannot import name 'SFTConfig' from
    'trl'", "... 'PreTrainedTokenizerBase' from 'transformers'": a half-imported module)."""
    import subprocess
    import sys

    code = (
        "import threading\n"
        "from lab import modeling\n"
        "errors = []\n"
        "def use(name):\n"
        "    try:\n"
        f"        if name == 'tokenizer': modeling.tokenizer({str(tiny_model_dir)!r}, log=print)\n"
        f"        elif name == 'model': modeling.causal_lm({{'path': {str(tiny_model_dir)!r}, 'kind': 'full'}})\n"
        "        else: getattr(modeling.trl(), name)\n"
        "    except Exception as exc:\n"
        "        errors.append(repr(exc))\n"
        "threads = [threading.Thread(target=use, args=(n,))\n"
        "           for n in ('SFTConfig', 'tokenizer', 'DPOTrainer', 'model', 'SFTTrainer')]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "print(errors or 'ok')\n")
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert done.stdout.strip().splitlines()[-1] == "ok", done.stdout + done.stderr


def test_the_estimate_counts_both_sequences_of_a_pair_each_cut_to_max_length(ws, tiny_model_dir, tmp_path):
    from test_diagnosis import long_pairs

    registry.add_folder(ws, "tiny", tiny_model_dir)
    rows = long_pairs("half-chosen", 4)
    datasets.add(ws, "pairs", write_jsonl(tmp_path / "pairs.jsonl", rows))
    counts = [preview.preference_row(str(tiny_model_dir), r) for r in rows]
    want = sum(min(c["chosen"]["count"], 64) + min(c["rejected"]["count"], 64) for c in counts) / 4
    est = preview.estimate(ws, "tiny", "pairs", {"max_length": 64, "batch_size": 2})
    assert est["mean_row_tokens"] == pytest.approx(want, abs=0.1) and want > 64
    assert est["tokens_per_step"] == round(2 * want)
