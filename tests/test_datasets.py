"""Dataset import: format detection, row validation with row numbers, and all-or-nothing registration."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from lab import datasets, registry
from lab.errors import LabError, ValidationError


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, "chat"),
        ({"instruction": "Add", "input": "1 and 2", "output": "3"}, "alpaca"),
        ({"prompt": "2+2=", "completion": "4"}, "prompt_completion"),
        ({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference"),
        ({"text": "win a prize now", "label": "spam"}, "classification"),
        ({"text": "Once upon a time"}, "text"),
    ],
)
def test_format_is_detected_from_columns(ws, tmp_path, row, fmt):
    info = datasets.add(ws, "d", write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert (info["format"], info["rows"]) == (fmt, 2)
    stored = ws.workspace / "datasets" / "d"
    assert (stored / "data.jsonl").exists() and (stored / "original.jsonl").exists()
    assert json.loads((stored / "dataset.json").read_text())["fingerprint"] == info["fingerprint"]


def test_csv_json_parquet_and_text_files(ws, tmp_path):
    (tmp_path / "a.csv").write_text("text,label\nwin money,spam\nsee you at 5,ham\n")
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"prompt": "p", "completion": "c"}]}))
    (tmp_path / "c.txt").write_text("First paragraph\nstill first.\n\nSecond paragraph.\n\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    pq.write_table(table, tmp_path / "d.parquet")
    assert datasets.add(ws, "a", tmp_path / "a.csv")["format"] == "classification"
    assert datasets.add(ws, "b", tmp_path / "b.json")["format"] == "prompt_completion"
    c = datasets.add(ws, "c", tmp_path / "c.txt")
    assert (c["format"], c["rows"]) == ("text", 2)
    assert datasets.preview(ws, "c", 5)[0]["text"] == "First paragraph\nstill first."
    assert datasets.add(ws, "d", tmp_path / "d.parquet")["rows"] == 2


def test_same_content_gives_the_same_fingerprint(ws, tmp_path):
    rows = [{"text": "a"}, {"text": "b"}]
    a = datasets.add(ws, "a", write_jsonl(tmp_path / "a.jsonl", rows))
    b = datasets.add(ws, "b", write_jsonl(tmp_path / "b.jsonl", rows))
    c = datasets.add(ws, "c", write_jsonl(tmp_path / "c.jsonl", rows[::-1]))
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]


def _refused(ws, path, fmt=None, name="bad"):
    """Assert the import fails and leaves no trace; return the message."""
    with pytest.raises(LabError) as info:
        datasets.add(ws, name, path, fmt)
    assert datasets.list_all(ws) == []
    ds_dir = ws.workspace / "datasets"
    assert not ds_dir.exists() or list(ds_dir.iterdir()) == []
    return str(info.value)


def test_bad_rows_are_listed_by_line_and_nothing_is_stored(ws, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(
        json.dumps({"instruction": "ok", "output": "fine"}) + "\n"
        + "{not json\n"
        + json.dumps({"instruction": "", "output": "x"}) + "\n"
        + json.dumps({"instruction": "q", "output": 5}) + "\n"
        + json.dumps({"instruction": "q"}) + "\n"
    )
    msg = _refused(ws, path, fmt="alpaca")
    assert "line 2: invalid JSON" in msg
    assert "line 3: `instruction` is empty" in msg
    assert "line 4: `output` must be text, got int" in msg
    assert "line 5: `output` is missing" in msg
    assert "line 1" not in msg


def test_at_most_20_problems_are_shown(ws, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": ""}] * 30)
    with pytest.raises(ValidationError) as info:
        datasets.add(ws, "x", path)
    assert len(info.value.problems) == 30
    assert "line 20:" in str(info.value) and "line 21:" not in str(info.value)
    assert "and 10 more" in str(info.value)


@pytest.mark.parametrize(
    ("content", "suffix", "fmt", "expected"),
    [
        (b"", ".jsonl", None, "is empty"),
        (b"\n\n", ".jsonl", None, "holds no rows"),
        (b'{"a": 1}\n', ".jsonl", None, "cannot tell the format"),
        (b'{"text": "caf\xe9"}\n', ".jsonl", None, "not UTF-8 text: byte 0xe9 on line 1 is not UTF-8"),
        (b"[1, 2]", ".json", None, "row 1: must be an object with named fields, got int"),
        (b'{"rows": [], "more": []}', ".json", None, "exactly one list"),
        (b"{broken", ".json", None, "invalid JSON"),
        (b"text,label\na,spam\nb,ham,extra\nc\n", ".csv", None, "row 2 (line 3): 3 fields, but the header has 2"),
        (b"text,label\na,spam\nc\n", ".csv", None, "row 2 (line 3): fewer fields"),
        (b"text,text\na,b\n", ".csv", None, "repeats a column"),
        (b"text,label\na,spam\nb,ham\n", ".csv", "chat", "has no `messages` column for the chat format: its columns "
                                                      "are text, label"),
        (b'{"text": "a"}\n', ".jsonl", "nonsense", "unknown format 'nonsense'"),
        (b"PAR1 not really", ".parquet", None, "not a readable Parquet file"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff", ".csv", None,
         "input.csv is not a text file: it looks like a PNG image"),
        (b"PAR1\x15\x04\x15\xd0\x0f", ".csv", None, "not a text file: it looks like a Parquet file"),
        (b"a,b", ".xlsx", None, "unsupported file type '.xlsx'"),
        (b'{"text": "a", "label": "spam"}\n{"text": "b", "label": 1}\n', ".jsonl", None,
         "`label` is text in some rows (line 1) and a number in others (line 2)"),
        (b'{"text": "a", "label": 1.5}\n', ".jsonl", None, "`label` must be text or a whole number, got float"),
        (b'{"chosen": "same", "rejected": "same"}\n', ".jsonl", None, "`chosen` and `rejected` are the same"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}\n', ".jsonl", None, "`messages[0].role` must be one of"),
        (b'{"messages": [{"role": "user", "content": "x"}]}\n', ".jsonl", None, "has no assistant turn"),
        (b'{"messages": "hello"}\n', ".jsonl", None, "`messages` must be a non-empty list"),
        (b'"just a string"\n', ".jsonl", "text", "line 1: must be an object with named fields, got str"),
    ],
)
def test_each_bad_input_gets_its_message_and_changes_nothing(ws, tmp_path, content, suffix, fmt, expected):
    path = tmp_path / f"input{suffix}"
    path.write_bytes(content)
    assert expected in _refused(ws, path, fmt)


def test_bad_names_and_duplicates_are_refused(ws, tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    for name in ("../escape", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(LabError, match="invalid dataset name"):
            datasets.add(ws, name, path)
    datasets.add(ws, "ok", path)
    with pytest.raises(LabError, match="already exists"):
        datasets.add(ws, "ok", path)
    assert [d["name"] for d in datasets.list_all(ws)] == ["ok"]


def test_missing_file(ws, tmp_path):
    assert "no such file" in _refused(ws, tmp_path / "nope.jsonl")


def test_jsonl_strings_with_unicode_line_separators_import_and_convert(ws, tmp_path):
    """U+2028, U+2029 and U+0085 inside JSON strings are text, not line ends (json.dumps writes them raw)."""
    import json

    from lab import datasets

    rows = [{"instruction": f"say {c!r}", "input": "", "output": f"a{c}b"} for c in ("\u2028", "\u2029", "\x85")]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    info = datasets.add(ws, "seps", path)
    assert (info["rows"], info["format"]) == (3, "alpaca")
    assert datasets.preview(ws, "seps", 3)[1]["output"] == "a\u2029b"
    converted = datasets.convert(ws, "seps", "seps-text", "text")
    assert converted["rows"] == 3


@pytest.mark.parametrize("name", ["ok\n", "ok\r\n", "a/b", "ok\nsecond"])
def test_names_must_match_the_rule_in_full(ws, tmp_path, name):
    from lab import datasets, experiments
    from lab.errors import LabError
    from lab.export import export

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    for attempt in (lambda: datasets.add(ws, name, path), lambda: experiments.create(ws, name),
                    lambda: registry.create_tiny(ws, name), lambda: export(ws, "missing", name)):
        with pytest.raises(LabError, match="invalid .* name"):
            attempt()
    assert datasets.list_all(ws) == []
