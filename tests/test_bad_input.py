"""Bad input: each malformed input gets its clear error and changes nothing (no row in the database, no file in the
workspace, nothing queued). Plus property-based tests of the dataset validators and the `--set` parser."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import lab_cli, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from lab import datasets, db, formats, plugins, registry, runs
from lab.errors import LabError, ValidationError
from lab.tables import Base

GOOD_SFT = [{"prompt": "Hi", "completion": "Hello"}, {"prompt": "Bye", "completion": "Goodbye"}]


def snapshot(s) -> tuple:
    """Every row of every table, and every file of the workspace with its size and modification time."""
    with db.read_session(s) as session:
        rows = {t.name: sorted(map(repr, session.execute(select(t)).all())) for t in Base.metadata.sorted_tables}
    files = {}
    for root, _, names in os.walk(s.workspace):
        for name in names:
            if name.startswith("lab.db"):  # the database file itself: its rows are compared above
                continue
            p = Path(root) / name
            st_ = p.stat()
            files[str(p.relative_to(s.workspace))] = (st_.st_size, st_.st_mtime_ns)
    return rows, files


@pytest.fixture
def lab(ws, tiny_model_dir, tmp_path):
    """A workspace with one model and one dataset, so that duplicates and wrong formats can be tried."""
    registry.add_folder(ws, "tiny", tiny_model_dir)
    datasets.add(ws, "facts", write_jsonl(tmp_path / "facts.jsonl", GOOD_SFT))
    datasets.add(ws, "spam", write_jsonl(tmp_path / "spam.jsonl", [{"text": "win", "label": "spam"},
                                                                   {"text": "hi", "label": "ham"}]))
    datasets.add(ws, "one-label", write_jsonl(tmp_path / "one.jsonl", [{"text": "win", "label": "spam"}] * 3))
    return ws


def _file(tmp: Path, name: str, content: bytes | str) -> Path:
    p = tmp / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    return p


def _zip(tmp: Path, member: str) -> Path:
    import zipfile

    path = tmp / "evil.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, '{"text": "a"}\n')
    return path


def _model_folder(tmp: Path, src: Path, drop: tuple[str, ...], replace: dict[str, bytes] | None = None) -> Path:
    folder = tmp / "broken-model"
    folder.mkdir()
    for f in src.iterdir():
        if f.name not in drop and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    for name, content in (replace or {}).items():
        (folder / name).write_bytes(content)
    return folder


# (id, action(settings, tmp, tiny_model_dir), the error it must give)
CASES = [
    ("empty file", lambda s, t, m: datasets.add(s, "d", _file(t, "e.jsonl", b"")), r"e\.jsonl is empty"),
    ("only blank lines", lambda s, t, m: datasets.add(s, "d", _file(t, "b.jsonl", "\n \n\n")), r"holds no rows"),
    ("invalid JSON on line 3", lambda s, t, m: datasets.add(s, "d", _file(
        t, "j.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')), r"line 3: invalid JSON"),
    ("a JSONL row that is a list", lambda s, t, m: datasets.add(s, "d", _file(
        t, "l.jsonl", '["a", "b"]\n')), r"line 1: must be an object with named fields, got list"),
    ("unknown columns", lambda s, t, m: datasets.add(s, "d", _file(t, "c.jsonl", '{"foo": 1}\n')),
     r"cannot tell the format of c\.jsonl: its columns are foo"),
    ("missing column for the format asked", lambda s, t, m: datasets.add(s, "d", _file(
        t, "m.jsonl", '{"prompt": "a"}\n'), fmt="prompt_completion"), r"completion"),
    ("mixed types in a column", lambda s, t, m: datasets.add(s, "d", _file(
        t, "x.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": "b"}\n')), r"line 2"),
    ("rows of two formats", lambda s, t, m: datasets.add(s, "d", _file(
        t, "two.jsonl", '{"prompt": "a", "completion": "b"}\n{"text": "c"}\n')), r"line 2"),
    ("empty text", lambda s, t, m: datasets.add(s, "d", _file(t, "et.jsonl", '{"text": ""}\n')), r"line 1"),
    ("non-UTF-8 bytes", lambda s, t, m: datasets.add(s, "d", _file(
        t, "latin.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"))),
     r"not UTF-8 text: byte 0xe9 on line 1 is not UTF-8(.|\n)*--encoding latin-1"),
    ("a 50 MB single line", lambda s, t, m: datasets.add(s, "d", _file(
        t, "big.jsonl", '{"text": "' + "a" * 50_000_000 + '"}')), r"line 1: 50\.0 million characters in one row"),
    ("a CSV with a ragged row", lambda s, t, m: datasets.add(s, "d", _file(
        t, "r.csv", "text,label\nhello,ham\nwin,spam,extra\n")), r"row 2 \(line 3\): 3 fields, but the header has 2"),
    ("a CSV with a short row", lambda s, t, m: datasets.add(s, "d", _file(
        t, "short.csv", "text,label\nhello\n")), r"fewer fields than the header's 2"),
    ("a CSV with a header only", lambda s, t, m: datasets.add(s, "d", _file(t, "h.csv", "text,label\n")),
     r"holds no rows"),
    ("a CSV header that repeats a name", lambda s, t, m: datasets.add(s, "d", _file(
        t, "rep.csv", "text,text\na,b\n")), r"repeats a column name"),
    ("a JSON file that is not a list", lambda s, t, m: datasets.add(s, "d", _file(t, "n.json", "42")),
     r"must hold a list of rows"),
    ("a Parquet file that is not Parquet", lambda s, t, m: datasets.add(s, "d", _file(t, "p.parquet", "nope")),
     r"not a readable Parquet file"),
    ("an unsupported file type", lambda s, t, m: datasets.add(s, "d", _file(t, "sheet.xlsx", "x")),
     r"unsupported file type '\.xlsx'"),
    ("a file that does not exist", lambda s, t, m: datasets.add(s, "d", t / "missing.jsonl"), r"no such file"),
    ("a folder with no data files", lambda s, t, m: datasets.add(s, "d", _file(t, "README.md", "x").parent),
     r"the folder inputs holds no data files"),
    ("a mapping to a field no format reads", lambda s, t, m: datasets.add(
        s, "d", _file(t, "m.csv", "sms,kind\nhi,ham\nyo,spam\n"), columns="body=sms,label=kind"),
     r"'body' is not a field any format reads"),
    ("a mapping that names a missing column", lambda s, t, m: datasets.add(
        s, "d", _file(t, "m.csv", "sms,kind\nhi,ham\nyo,spam\n"), columns="text=message,label=kind"),
     r"m.csv has no column 'message' to map(.|\n)*its columns are sms, kind"),
    ("a mapping without '='", lambda s, t, m: datasets.add(
        s, "d", _file(t, "m.csv", "sms,kind\nhi,ham\n"), columns="text:sms"), r"cannot read the column mapping"),
    ("an unknown encoding", lambda s, t, m: datasets.add(s, "d", _file(t, "e.csv", "text\nhi\n"), encoding="klingon"),
     r"unknown encoding 'klingon'"),
    ("a split the folder lacks", lambda s, t, m: datasets.add(
        s, "d", _file(t, "train.jsonl", '{"text": "a"}\n').parent, split="dev"),
     r"has no split 'dev'(.|\n)*its splits are train"),
    ("an empty split", lambda s, t, m: datasets.add(
        s, "d", (_file(t, "train.jsonl", '{"text": "a"}\n'), _file(t, "test.jsonl", "\n\n"))[0].parent),
     r"the split 'test' of the folder inputs holds no rows"),
    ("a zip that unpacks outside its folder", lambda s, t, m: datasets.add(s, "d", _zip(t, "../x.jsonl")),
     r"would unpack outside its folder"),
    ("a hub id not in the local cache", lambda s, t, m: registry.add_folder(s, "m", "acme/definitely-missing"),
     r"acme/definitely-missing is not in the local Hugging Face cache"),
    ("--base for a model that is not an adapter", lambda s, t, m: registry.add_folder(s, "m", m, base="x"),
     r"is a model, not an adapter"),
    ("a split asked of a single file", lambda s, t, m: datasets.add(
        s, "d", _file(t, "one.jsonl", '{"text": "a"}\n'), split="test"), r"one file: it has no splits"),
    ("an unknown format name", lambda s, t, m: datasets.add(s, "d", _file(t, "u.jsonl", '{"text": "a"}\n'),
                                                           fmt="yaml"), r"unknown format 'yaml'"),
    ("a duplicate dataset name", lambda s, t, m: datasets.add(s, "facts", write_jsonl(t / "f2.jsonl", GOOD_SFT)),
     r"a dataset named 'facts' already exists"),
    ("a name with a path separator", lambda s, t, m: datasets.add(s, "a/b", write_jsonl(t / "g.jsonl", GOOD_SFT)),
     r"invalid dataset name 'a/b'"),
    ("a name with ..", lambda s, t, m: datasets.add(s, "..", write_jsonl(t / "g.jsonl", GOOD_SFT)),
     r"invalid dataset name '\.\.'"),
    ("an absolute path as a name", lambda s, t, m: datasets.add(s, "/etc", write_jsonl(t / "g.jsonl", GOOD_SFT)),
     r"invalid dataset name '/etc'"),
    ("an empty name", lambda s, t, m: datasets.add(s, "", write_jsonl(t / "g.jsonl", GOOD_SFT)),
     r"invalid dataset name ''"),
    ("a model name with ..", lambda s, t, m: registry.add_folder(s, "up..", m), r"invalid model name"),
    ("a duplicate model name", lambda s, t, m: registry.add_folder(s, "tiny", m), r"already exists"),
    ("a model folder without weights", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, ("model.safetensors",))), r"has no model weights"),
    ("a model folder without config.json", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, ("config.json",))), r"config\.json is missing"),
    ("a model folder that does not exist", lambda s, t, m: registry.add_folder(s, "w", t / "nowhere"),
     r"no such folder"),
    ("a GGUF that is not GGUF", lambda s, t, m: registry.import_gguf(s, "g", _file(t, "fake.gguf", "not gguf")),
     r"fake\.gguf is not a GGUF file"),
    ("an unknown plugin", lambda s, t, m: runs.submit(s, "sft2", model="tiny", dataset="facts"),
     r"no plugin 'sft2'|unknown plugin"),
    ("an unknown parameter", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                         params={"learnin_rate": "1e-4"}), r"learnin_rate"),
    ("an out-of-range value", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                          params={"learning_rate": "-1"}), r"learning_rate"),
    ("a wrongly typed value", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                          params={"max_steps": "ten"}), r"max_steps"),
    ("an unknown model", lambda s, t, m: runs.submit(s, "sft", model="nope", dataset="facts"), r"nope"),
    ("an unknown dataset", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="nope"), r"nope"),
    ("a dataset in the wrong format", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="spam"),
     r"classification"),
    ("an experiment name with a slash", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                                    experiment="../x"), r"invalid experiment name"),
    ("a priority that is not a number", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                                    priority="high"), r"priority"),
    ("a conversion to an unknown format", lambda s, t, m: datasets.convert(s, "facts", "facts2", "yaml"),
     r"yaml"),
    ("a negative seed", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                     params={"seed": "-1"}), r"`seed`: a seed must be from 0"),
    ("a seed past 2**32", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                      params={"seed": str(10**23)}), r"`seed`"),
    ("max_steps of 10**30", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                        params={"max_steps": str(10**30)}), r"`max_steps`: at most"),
    ("max_steps of 0", lambda s, t, m: runs.submit(s, "dpo", model="tiny", dataset="facts",
                                                   params={"max_steps": "0"}), r"`max_steps`: 0 trains nothing"),
    ("epochs of 1e400", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                    params={"epochs": "1e400"}), r"`epochs`"),
    ("NaN in extra_args", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                      params={"extra_args": '{"max_grad_norm": NaN}'}),
     r"`extra_args\.max_grad_norm`: must be a finite number"),
    ("deepspeed in extra_args", lambda s, t, m: runs.submit(s, "sft", model="tiny", dataset="facts",
                                                            params={"deepspeed": str(t)}), r"DeepSpeed is not set up"),
    ("classify on a single label", lambda s, t, m: runs.submit(s, "classify", model="tiny", dataset="one-label"),
     r"single label \(spam\)"),
    ("deeply nested JSONL", lambda s, t, m: datasets.add(s, "d", _file(t, "deep.jsonl", "[" * 100_000 + "\n")),
     r"line 1: JSON nested too deeply"),
    ("deeply nested JSON", lambda s, t, m: datasets.add(s, "d", _file(t, "deep.json", "[" * 100_000)),
     r"nested too deeply"),
    ("a config.json that is a list", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, (), {"config.json": b"[1, 2]"})), r"config\.json must hold a JSON object"),
    ("a broken adapter_config.json", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, (), {"adapter_config.json": b"{oops", "adapter_model.safetensors": b"x"})),
     r"adapter_config\.json is not valid JSON"),
    ("a truncated safetensors header", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, (), {"model.safetensors": (m / "model.safetensors").read_bytes()[:40]})),
     r"model\.safetensors is not a usable safetensors file: its header is unreadable"),
    ("zero-byte weights", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, (), {"model.safetensors": b""})),
     r"model\.safetensors is not a usable safetensors file: it is empty"),
    ("an invalid tokenizer.json", lambda s, t, m: registry.add_folder(
        s, "w", _model_folder(t, m, (), {"tokenizer.json": b'{"model": 3}'})), r"is not a readable tokenizer"),
    ("--set without =", lambda s, t, m: plugins.parse_sets(["max_steps"]), r"--set expects key=value"),
    ("--set given twice", lambda s, t, m: plugins.parse_sets(["a=1", "a=2"]), r"--set a is given twice"),
]


@pytest.mark.parametrize("action, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_with_its_reason_and_changes_nothing(lab, tmp_path, tiny_model_dir, action, message):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    before = snapshot(lab)
    with pytest.raises(LabError) as caught:
        action(lab, inputs, tiny_model_dir)
    text = str(caught.value) + "\n" + "\n".join(getattr(caught.value, "problems", []) or [])
    assert re.search(message, text), text
    assert snapshot(lab) == before, "a refused input must leave the database and the workspace as they were"


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("args, message", [
    (["datasets", "add", "d", "missing.jsonl"], "no such file"),
    (["run", "sft", "--model", "tiny", "--dataset", "facts", "--set", "learnin_rate=1"], "learnin_rate"),
    (["models", "add", "a/b", "."], "invalid model name"),
    (["worker", "--gpus", "0,0"], "distinct device numbers"),
    (["run", "sleeping", "--processes", "2"], "runs in one process"),
])
def test_the_cli_says_why_in_one_line_without_a_traceback(lab, args, message, jobs_worker):
    before = snapshot(lab)
    done = lab_cli(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr + done.stdout
    assert snapshot(lab) == before


# --- properties -------------------------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                          max_leaves=6)


@settings(max_examples=150, deadline=None)
@given(row=st.dictionaries(st.sampled_from(["text", "prompt", "completion", "label", "chosen", "rejected",
                                            "messages", "instruction", "input", "output", "other"]),
                           json_value, max_size=5))
def test_check_row_returns_readable_problems_for_any_row(row):
    """Whatever a row holds, checking it against any format gives a list of strings, never an exception."""
    for fmt in formats.FORMATS:
        problems = formats.check_row(fmt, row)
        assert isinstance(problems, list) and all(isinstance(p, str) and p for p in problems)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(json_value.map(json.dumps), text), min_size=1, max_size=6))
def test_reading_any_jsonl_either_succeeds_or_says_why(tmp_path, lines):
    """Any file of JSON values and junk lines: rows with their places, or a LabError. Nothing else escapes."""
    p = tmp_path / "any.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8")
    try:
        loaded = datasets.read_file(p)
        datasets.validate(loaded, None, p.name)
    except ValidationError as exc:
        assert exc.problems and all(isinstance(x, str) for x in exc.problems)
    except LabError as exc:
        assert str(exc)
    else:
        assert len(loaded.rows) == len(loaded.places) and not loaded.problems


key = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)


@given(pairs=st.dictionaries(key, st.text(max_size=20), max_size=6))
def test_set_parser_round_trips_key_value_pairs(pairs):
    assert plugins.parse_sets([f"{k}={v}" for k, v in pairs.items()]) == pairs


@given(item=st.text(max_size=20).filter(lambda t: "=" not in t or not t.split("=", 1)[0].strip()))
def test_set_parser_refuses_items_without_a_key(item):
    with pytest.raises(LabError, match="--set expects key=value"):
        plugins.parse_sets([item])
