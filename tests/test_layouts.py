"""The files people already have, imported as they are: ShareGPT, TRL's conversational rows, CSVs in other
encodings, dialects and column names, `save_to_disk` folders, hub-style shard folders and zipped folders. And the
rule that a dataset that imports trains with every method that accepts its format: each plugin's own row conversion
runs over every variant of every format it accepts, and the trainers' own preparation takes the result."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from conftest import write_jsonl

from jobs.worker import Worker
from lab import datasets, formats, plugins, registry, runs
from lab.errors import LabError

USER, BOT = {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}

# every variant of every stored format that an import accepts
VARIANTS: dict[str, dict[str, list[dict]]] = {
    "chat": {
        "one turn": [{"messages": [USER, BOT]}],
        "system and two turns": [{"messages": [{"role": "system", "content": "Be brief."}, USER, BOT,
                                               {"role": "user", "content": "And Spain?"},
                                               {"role": "assistant", "content": "Madrid."}]}],
    },
    "alpaca": {
        "with input": [{"instruction": "Translate.", "input": "bonjour", "output": "hello"}],
        "without input": [{"instruction": "Say hi.", "output": "Hi!"}],
    },
    "prompt_completion": {
        "texts": [{"prompt": "2+2=", "completion": "4"}],
        "conversational (TRL)": [{"prompt": [{"role": "system", "content": "Be brief."}, USER],
                                  "completion": [BOT]}],
    },
    "preference": {
        "explicit texts": [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}],
        "explicit conversational": [{"prompt": [USER], "chosen": [BOT],
                                     "rejected": [{"role": "assistant", "content": "Rome."}]}],
        "implicit conversational (TRL)": [{"chosen": [USER, BOT],
                                           "rejected": [USER, {"role": "assistant", "content": "Rome."}]}],
        "implicit texts": [{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
        "hh-rlhf transcripts": [{"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris.",
                                 "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Rome."}],
    },
    "classification": {
        "text labels": [{"text": "win cash now", "label": "spam"}, {"text": "see you soon", "label": "ham"}],
        "number labels": [{"text": "win cash now", "label": 1}, {"text": "see you soon", "label": 0}],
    },
    "text": {"paragraphs": [{"text": "The lab trains language models."}, {"text": "It keeps every run."}]},
    "candidates": {
        "conversational prompt, answers with their models": [
            {"id": "q1", "prompt": [USER], "candidates": [{"text": "Paris.", "model": "sft-3"},
                                                          {"text": "Rome.", "model": "tiny"}]}],
        "text prompt, bare answers": [{"prompt": "2+2=", "candidates": [{"text": "4"}, {"text": "5"}, {"text": "4"}]}],
    },
}

PLUGINS = {p.id: p for p in (plugins._load(m, "built-in") for m in plugins.BUILTINS) if p.accepts}
CASES = [(pid, fmt, variant) for pid, p in sorted(PLUGINS.items()) for fmt in p.accepts for variant in VARIANTS[fmt]]


def test_every_format_and_variant_is_covered_and_valid():
    assert set(VARIANTS) == set(formats.FORMATS)
    for fmt, variants in VARIANTS.items():
        for name, rows in variants.items():
            for row in rows:
                assert formats.check_row(fmt, row) == [], (fmt, name, row)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from lab import modeling

    return modeling.tokenizer(str(tiny_model_dir), log=lambda m: None)


def _through_trainer(pid: str, examples: list, tok) -> int:
    """How many examples the trainer's own dataset preparation (TRL's, as training runs it) keeps."""
    import tempfile
    from types import SimpleNamespace

    from datasets import Dataset

    from lab import preview
    from lab.modeling import trl

    module = trl()
    if pid == "sft":
        return len(preview.sft_prepare(tok, examples, completion_only="prompt" in examples[0], max_length=None))
    trainers = {"dpo": (module.DPOConfig, module.DPOTrainer), "kto": (module.KTOConfig, module.KTOTrainer),
                "reward": (module.RewardConfig, module.RewardTrainer)}
    if pid in trainers:
        config, trainer = trainers[pid]
        with tempfile.TemporaryDirectory() as tmp:
            args = config(output_dir=tmp, use_cpu=True, report_to=[], max_length=None)
        stand_in = SimpleNamespace(_tokenizer=tok, calculate_KL=False)
        return len(trainer._prepare_dataset(stand_in, Dataset.from_list(examples), tok, args, "test"))
    if pid == "orpo":
        rows = [{**e, "lab_row": i} for i, e in enumerate(examples)]
        return len(preview._kept_by_orpo(tok, [{k: v for k, v in r.items() if k != "lab_row"} for r in rows], 10_000))
    if pid in ("grpo", "eval-generate"):
        return sum(bool(tok.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False))
                   for e in examples)
    if pid in ("ppo", "eval-reward", "generate", "eval-judge", "synthesize"):
        return sum(bool(tok.apply_chat_template(e, add_generation_prompt=True, tokenize=False)) for e in examples)
    if pid == "eval-perplexity":
        return sum(bool(tok.apply_chat_template(e, tokenize=False) if isinstance(e, list) else tok(e)["input_ids"])
                   for e in examples)
    if pid == "eval-preference":
        return sum(bool(e["prompt"]) and bool(e["chosen"]) and bool(e["rejected"]) for e in examples)
    if pid in ("classify", "eval-classify", "eval-fewshot"):
        return sum(isinstance(e["text"], str) and isinstance(e["label"], str) for e in examples)
    if pid == "pretrain":
        return sum(bool(tok(e)["input_ids"]) for e in examples)
    raise AssertionError(f"no check for plugin {pid}: add one")


@pytest.mark.parametrize(("pid", "fmt", "variant"), CASES, ids=[f"{p}-{f}-{v}" for p, f, v in CASES])
def test_each_plugin_takes_every_variant_of_the_formats_it_accepts(pid, fmt, variant, tiny_tokenizer):
    rows = VARIANTS[fmt][variant]
    module = PLUGINS[pid].module
    assert hasattr(module, "examples"), f"plugin {pid} reads datasets: it must say how (examples)"
    examples = module.examples(fmt, rows)
    kept = _through_trainer(pid, examples, tiny_tokenizer)
    per_row = 2 if pid == "kto" else 1  # kto unpairs each pair
    assert kept == len(rows) * per_row, (pid, fmt, variant, examples)


# --- layouts -------------------------------------------------------------------------------------------------


def test_sharegpt_json_and_jsonl_are_stored_as_chat(ws, tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
             "system": "Be brief."},
            {"conversations": [{"from": "human", "value": "Weather?"},
                               {"from": "function_call", "value": '{"name": "weather"}'},
                               {"from": "observation", "value": "sunny"},
                               {"from": "gpt", "value": "It is sunny."}], "id": "x2"}]
    (tmp_path / "sg.json").write_text(json.dumps(rows))
    info = datasets.add(ws, "sg", tmp_path / "sg.json")
    assert info["format"] == "chat" and info["rows"] == 2
    assert any("sharegpt" in n for n in info["notes"])
    first, second = datasets.preview(ws, "sg", 2)
    assert first["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"}]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert second["id"] == "x2"  # other columns are kept
    info = datasets.add(ws, "sg2", write_jsonl(tmp_path / "sg.jsonl", rows))
    assert info["format"] == "chat" and info["fingerprint"] == datasets.info(ws, "sg")["fingerprint"]


def test_sharegpt_rows_are_checked_like_any_other(ws, tmp_path):
    bad = [{"conversations": [{"from": "human", "value": "Hi"}]},
           {"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    with pytest.raises(LabError) as caught:
        datasets.add(ws, "bad", write_jsonl(tmp_path / "bad.jsonl", bad))
    text = "\n".join(caught.value.problems)
    assert "line 1: `messages` has no assistant turn" in text
    assert "line 2: `conversations[0].from` must be one of" in text
    assert datasets.list_all(ws) == []


def test_a_latin1_csv_as_distributed_maps_to_classification(ws, tmp_path):
    # the SMS spam file as it is distributed: header v1,v2,,, and Latin-1 bytes; one row spills into column 3
    raw = ('v1,v2,,,\r\nham,"Ok lar... Joking wif u oni...",,,\r\nspam,"Free entry: win \xa3100 now",,,\r\n'
           'ham,"See you at the caf\xe9",later,,\r\nspam,"Claim your prize, call now",,,\r\n').encode("latin-1")
    path = tmp_path / "spam.csv"
    path.write_bytes(raw)
    with pytest.raises(LabError, match=r"byte 0xa3 on line 3 is not UTF-8") as caught:
        datasets.add(ws, "spam", path)
    assert "--encoding latin-1" in caught.value.hint
    with pytest.raises(LabError, match="cannot tell the format") as caught:
        datasets.add(ws, "spam", path, encoding="latin-1")
    assert "--columns text=v2,label=v1" in caught.value.hint
    info = datasets.add(ws, "spam", path, encoding="latin-1", columns="text=v2,label=v1")
    assert info["format"] == "classification" and info["rows"] == 4
    assert datasets.preview(ws, "spam", 2, 1)[0]["text"] == "Free entry: win £100 now"
    assert datasets.preview(ws, "spam", 1, 2)[0]["column_3"] == "later"
    assert any("2 header columns without a name and without data dropped" in n for n in info["notes"])
    assert any("column_3" in n for n in info["notes"])
    meta = json.loads((Path(info["path"]) / "dataset.json").read_text())
    assert meta["columns_mapped"] == {"text": "v2", "label": "v1"} and meta["encoding"] == "latin-1"


def test_utf16_semicolon_csv_with_quoted_newlines_is_read_as_it_is(ws, tmp_path):
    text = 'text;label\r\n"line one\r\nline two";a\r\n"x; y";b\r\n'
    path = tmp_path / "excel.csv"
    path.write_bytes(text.encode("utf-16"))  # with its byte-order mark, as spreadsheet programs save it
    info = datasets.add(ws, "excel", path)
    assert info["format"] == "classification" and info["rows"] == 2
    rows = datasets.preview(ws, "excel", 2)
    assert rows[0]["text"] == "line one\r\nline two" and rows[1] == {"text": "x; y", "label": "b"}
    assert any("semicolons" in n for n in info["notes"]) and any("UTF-16" in n for n in info["notes"])
    (tmp_path / "t.tsv").write_text("prompt\tcompletion\nhi\thello\n")
    assert datasets.add(ws, "tsv", tmp_path / "t.tsv")["format"] == "prompt_completion"


@pytest.mark.parametrize(("columns", "rows", "expected"), [
    (["question", "answer"], [{"question": "q", "answer": "a"}], "--columns prompt=question,completion=answer"),
    (["sms", "label"], [{"sms": "hi there", "label": "ham"}, {"sms": "win", "label": "spam"}], "--columns text=sms"),
    (["input", "output"], [{"input": "q", "output": "a"}], "--columns prompt=input,completion=output"),
    (["question", "chosen_response", "rejected_response"],
     [{"question": "q", "chosen_response": "a", "rejected_response": "b"}],
     "--columns chosen=chosen_response,rejected=rejected_response,prompt=question"),
])
def test_a_near_miss_names_the_mapping_to_use(ws, tmp_path, columns, rows, expected):
    path = write_jsonl(tmp_path / "near.jsonl", rows)
    with pytest.raises(LabError) as caught:
        datasets.add(ws, "near", path)
    assert expected in caught.value.hint
    mapping = expected.removeprefix("--columns ")
    assert datasets.add(ws, "near", path, columns=mapping)["rows"] == len(rows)


def test_text_with_a_label_like_column_says_why_it_is_text(ws, tmp_path):
    rows = [{"text": "win cash", "category": "spam"}, {"text": "hi mum", "category": "ham"},
            {"text": "dinner?", "category": "ham"}]
    info = datasets.add(ws, "t", write_jsonl(tmp_path / "t.jsonl", rows))
    assert info["format"] == "text"
    assert any("no `label`" in n and "--columns label=category" in n for n in info["notes"])


def _dataset_dict(folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"text": f"t{i}", "label": ("ham", "spam")[i % 2]} for i in range(6)]),
                 "test": Dataset.from_list([{"text": "held", "label": "ham"}, {"text": "out", "label": "spam"}])}
                ).save_to_disk(str(folder))
    return folder


def test_a_save_to_disk_dataset_dict_keeps_its_test_split(ws, tmp_path):
    info = datasets.add(ws, "dd", _dataset_dict(tmp_path / "dd"))
    assert (info["format"], info["rows"], info["test_rows"]) == ("classification", 6, 2)
    assert [r["text"] for r in datasets.iter_rows(info["path"], "test")] == ["held", "out"]
    assert "held" not in [r["text"] for r in datasets.iter_rows(info["path"])]
    only = datasets.add(ws, "dd-test", tmp_path / "dd", split="test", test_split="none")
    assert (only["rows"], only["test_rows"]) == (2, None)
    from datasets import Dataset

    Dataset.from_list([{"prompt": "a", "completion": "b"}]).save_to_disk(str(tmp_path / "one"))
    assert datasets.add(ws, "one", tmp_path / "one")["format"] == "prompt_completion"


def _hub_folder(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    for name, n in (("train-00000-of-00002", 3), ("train-00001-of-00002", 2), ("test-00000-of-00001", 2)):
        pq.write_table(pa.table({"instruction": [f"{name} {i}" for i in range(n)], "output": ["ok"] * n}),
                       folder / "data" / f"{name}.parquet")
    (folder / "README.md").write_text("---\nlicense: mit\n---\n")
    return folder


def test_a_hub_style_shard_folder_and_its_zip(ws, tmp_path):
    folder = _hub_folder(tmp_path / "hub")
    info = datasets.add(ws, "hub", folder)
    assert (info["format"], info["rows"], info["test_rows"]) == ("alpaca", 5, 2)
    zipped = tmp_path / "hub.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        for f in folder.rglob("*"):
            z.write(f, Path("hub") / f.relative_to(folder))
    assert datasets.add(ws, "hubz", zipped)["fingerprint"] == info["fingerprint"]


def test_conversion_keeps_the_test_split_and_implicit_prompts(ws, tmp_path):
    rows = VARIANTS["preference"]["implicit conversational (TRL)"] * 3
    datasets.add(ws, "implicit", write_jsonl(tmp_path / "i.jsonl", rows))
    info = datasets.convert(ws, "implicit", "explicit", "preference")
    assert datasets.preview(ws, "explicit", 1)[0] == {"prompt": [USER], "chosen": [BOT],
                                                      "rejected": [{"role": "assistant", "content": "Rome."}]}
    datasets.add(ws, "dd", _dataset_dict(tmp_path / "dd"))
    assert datasets.convert(ws, "dd", "dd-text", "text")["test_rows"] == 2
    assert info["rows"] == 3


def test_preview_of_an_import_stores_nothing(ws, tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("sms,kind\nhello,ham\nwin,spam\n")
    found = datasets.check(path, columns="text=sms,label=kind")
    assert found["format"] == "classification" and found["first"][0] == {"text": "hello", "label": "ham"}
    folder = ws.workspace / "datasets"
    assert datasets.list_all(ws) == [] and (not folder.exists() or not any(folder.iterdir()))


# --- short jobs on each layout, with a tiny model -------------------------------------------------------------


def _run(s, plugin: str, dataset: str, model: str = "tiny", **params) -> dict:
    job_id = runs.submit(s, plugin, model=model, dataset=dataset, params={k: str(v) for k, v in params.items()})
    Worker(s, say=lambda m: None).serve(once=True)
    job = runs.get_job(s, job_id)
    assert job["status"] == "completed", f"{job['error']}\n{job['log_tail']}"
    return job


@pytest.mark.slow
def test_short_jobs_train_on_each_layout(ws, tmp_path, tiny_model_dir):
    registry.add_folder(ws, "tiny", tiny_model_dir)
    sharegpt = [{"conversations": [{"from": "human", "value": f"Say {i}"}, {"from": "gpt", "value": f"{i}!"}]}
                for i in range(8)]
    datasets.add(ws, "sg", write_jsonl(tmp_path / "sg.jsonl", sharegpt))
    _run(ws, "sft", "sg", max_steps=1, batch_size=2, eval_split=0)
    datasets.add(ws, "hub", _hub_folder(tmp_path / "hub"))
    _run(ws, "sft", "hub", max_steps=1, batch_size=2, eval_split=0)
    pairs = VARIANTS["preference"]["implicit conversational (TRL)"] * 8
    datasets.add(ws, "implicit", write_jsonl(tmp_path / "i.jsonl", pairs))
    for plugin in ("dpo", "reward", "orpo", "kto"):
        _run(ws, plugin, "implicit", max_steps=1, batch_size=2, **({} if plugin in ("orpo", "kto") else
                                                                  {"eval_split": 0}))
    conv = VARIANTS["prompt_completion"]["conversational (TRL)"] * 8
    datasets.add(ws, "conv", write_jsonl(tmp_path / "c.jsonl", conv))
    _run(ws, "sft", "conv", max_steps=1, batch_size=2, eval_split=0)
    path = tmp_path / "spam.csv"
    path.write_bytes(("v1,v2,,,\n" + "".join(f"{'spam' if i % 3 == 0 else 'ham'},message {i} \xa3,,,\n"
                                             for i in range(12))).encode("latin-1"))
    datasets.add(ws, "spam", path, encoding="latin-1", columns="text=v2,label=v1")
    classifier = _run(ws, "classify", "spam", max_steps=1, batch_size=4, eval_split=0)["output_model"]
    datasets.add(ws, "dd", _dataset_dict(tmp_path / "dd"))
    # an evaluation reads the held-out split (2 rows), training the 6 others
    job = _run(ws, "eval-classify", "dd", model=classifier)
    results = json.loads((Path(job["run_dir"]) / "output" / "results.json").read_text())
    assert results["results"]["rows"] == 2
    assert "held-out test split of dd (2 rows" in job["log_tail"]
    sft_on_test = _run(ws, "classify", "dd", max_steps=1, batch_size=2, eval_split=0)
    assert "6 training rows" in sft_on_test["log_tail"]
