"""Datasets: read a file or a dataset folder (see lab.sources), map its columns, detect its format, validate every
row, store it.

A dataset is stored as `workspace/datasets/<name>/` with `data.jsonl` (the rows to train on, normalised), `test.jsonl`
when the source had a held-out test split (evaluation reads it; training never does), the original file, and
`dataset.json` (format, columns, rows, fingerprint, where it came from and how it was read). Nothing is stored or
registered unless every row is valid.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import select

from lab import formats, mapping, sources
from lab.db import read_session, session
from lab.errors import LabError, ValidationError
from lab.settings import Settings
from lab.sources import Loaded, read_file  # noqa: F401 (the readers' results, as callers know them)
from lab.tables import Dataset
from lab.workspace import check_name, datasets_dir, staging

DATA_FILE = "data.jsonl"
TEST_FILE = "test.jsonl"


def columns_of(rows: list[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


def _count(problems: list[str]) -> str:
    return f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"


def _label_types(rows: list[Any], places: list[str]) -> list[str]:
    """Classification labels must be all text or all numbers, or the label map would hold '1' and 1."""
    first: dict[str, str] = {}
    for row, place in zip(rows, places, strict=True):
        label = row.get("label") if isinstance(row, dict) else None
        kind = "text" if isinstance(label, str) else "number" if isinstance(label, int) else None
        if kind:
            first.setdefault(kind, place)
    if len(first) == 2:
        return [f"`label` is text in some rows ({first['text']}) and a number in others ({first['number']})"]
    return []


def _repeated_ids(rows: list[Any], places: list[str]) -> list[str]:
    """Candidates rows are ranked by id: two rows with one id would share their rankings."""
    first: dict[str, str] = {}
    problems = []
    for row, place in zip(rows, places, strict=True):
        if "id" in row:
            key = str(row["id"])
            if key in first:
                problems.append(f"{place}: `id` {key!r} is already used ({first[key]})")
            first.setdefault(key, place)
    return problems


def _hint_for(columns: list[str], rows: list[Any]) -> str | None:
    found = mapping.suggest(columns, rows)
    return mapping.hint(*found) if found else None


def validate(loaded: Loaded, fmt: str | None, name: str) -> tuple[str, list[str]]:
    """The format (given or detected; an import layout such as sharegpt before its conversion) and the columns;
    raises ValidationError listing every bad row."""
    not_objects = [f"{place}: {problem}" for row, place in zip(loaded.rows, loaded.places, strict=True)
                   if (problem := formats.object_problem(row))]
    if not_objects:
        raise ValidationError(f"{name} is not a table of rows ({_count(not_objects)}):",
                              loaded.problems + not_objects)
    columns = columns_of(loaded.rows)
    if fmt is None:
        fmt = formats.detect(columns)
        if fmt is None and loaded.problems:  # unreadable lines first: they may be why no format shows
            raise ValidationError(f"{name} could not be read ({_count(loaded.problems)}):", loaded.problems)
        if fmt is None:
            raise LabError(
                f"cannot tell the format of {name}: its columns are {', '.join(columns) or '(none)'}",
                _hint_for(columns, loaded.rows) or "expected one of: " + "; ".join(
                    f"{k} ({v})" for k, v in {**formats.FORMATS, **formats.LAYOUTS}.items())
                + f"; or map the columns: --columns {mapping.SYNTAX}",
            )
    elif fmt not in formats.FORMATS and fmt not in formats.LAYOUTS:
        raise LabError(f"unknown format {fmt!r}", f"choose one of {', '.join([*formats.FORMATS, *formats.LAYOUTS])}")
    absent = [c for c in formats.REQUIRED[fmt] if c not in columns]
    if absent and loaded.rows:  # one message for the file, not one per row
        found = mapping.suggest(columns, loaded.rows)
        raise LabError(
            f"{name} has no {', '.join(f'`{c}`' for c in absent)} column for the {fmt} format: its columns are "
            f"{', '.join(columns) or '(none)'}",
            mapping.hint(*found) if found and found[0] == fmt else f"map a column to it: --columns {mapping.SYNTAX}")
    problems = list(loaded.problems)
    for row, place in zip(loaded.rows, loaded.places, strict=True):
        problems += [f"{place}: {p}" for p in formats.check_row(fmt, row)]
    if fmt == "classification" and not problems:
        problems += _label_types(loaded.rows, loaded.places)
    if fmt == "candidates" and not problems:
        problems += _repeated_ids(loaded.rows, loaded.places)
    if problems:
        raise ValidationError(f"{name} is not a valid {fmt} dataset ({_count(problems)}):", problems)
    return fmt, columns


def _text_note(columns: list[str], rows: list[Any]) -> str | None:
    """Why a file with more than a `text` column was taken as raw text, and what would make it classification."""
    others = [c for c in columns if c != "text"]
    if not others:
        return None
    note = (f"format text (raw text for pretraining): the file has a `text` column and no `label`; its other "
            f"columns ({', '.join(others)}) are kept but not used")
    label = next((c for c in others if mapping.label_like(rows, c)), None)
    if label:
        note += (f". To import it as classification with `{label}` as the label: --columns label={label} "
                 "(or map it on the Datasets page)")
    return note


def prepare(loaded: Loaded, fmt: str | None, columns: dict[str, str], name: str) -> tuple[str, str, list[dict],
                                                                                          list[str]]:
    """The rows as stored: mapped, validated, converted from an import layout. Returns the stored format, the
    layout it was read as, the rows and notes on what was done."""
    notes = mapping.apply(loaded.rows, columns, columns_of(loaded.rows), name)
    layout, cols = validate(loaded, fmt, name)
    rows = loaded.rows
    if layout == "text" and fmt is None and (note := _text_note(cols, rows)):
        notes.append(note)
    stored = layout
    if layout in formats.STORED_AS:
        stored, convert = formats.STORED_AS[layout]
        rows = [convert(r) for r in rows]
        notes.append(f"{layout} rows stored as {stored}")
    return stored, layout, rows, notes


def _jsonl_bytes(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def _exists(settings: Settings, name: str) -> bool:
    with read_session(settings) as s:
        return s.scalar(select(Dataset.id).where(Dataset.name == name)) is not None


def _load(file: Path, fmt: str | None, columns, encoding: str | None, split: str | None, test_split: str | None):
    mapped = mapping.parse(columns)
    src = sources.read(file, encoding=encoding or None, split=split or None, test_split=test_split or None)
    stored, layout, rows, notes = prepare(src.train, fmt, mapped, src.name)
    test = None
    if src.test is not None:
        _, _, test, _ = prepare(src.test, layout, mapped, f"{src.name} (split {src.test_split})")
    return mapped, src, stored, layout, rows, test, src.notes + notes


def check(file: str | Path, fmt: str | None = None, *, columns: str | dict | None = None,
          encoding: str | None = None, split: str | None = None, test_split: str | None = None,
          show: int = 3) -> dict:
    """What `add` would store, without storing anything: the format, the counts, the notes and the first rows
    as they would be kept. Raises what `add` would raise."""
    _, src, stored, layout, rows, test, notes = _load(Path(file).expanduser(), fmt, columns, encoding, split,
                                                      test_split)
    return {"format": stored, "layout": layout, "rows": len(rows), "test_rows": None if test is None else len(test),
            "columns": columns_of(rows), "notes": notes, "first": rows[:show]}


def add(settings: Settings, name: str, file: str | Path, fmt: str | None = None, source: str | None = None, *,
        columns: str | dict | None = None, encoding: str | None = None, split: str | None = None,
        test_split: str | None = None, db=None) -> dict:
    """Validate a file or dataset folder and register it as dataset `name`; all or nothing (with `db`, the row is
    added in the caller's open session and counts once it commits; a folder left by a commit that failed is rebuilt
    by the next `add` of that name). `columns` maps the
    file's columns to a format's fields (`text=v2,label=v1`), `encoding` names a text file's encoding, `split` and
    `test_split` pick a folder's splits. `source` says where it came from. The result's `notes` say what was done
    beyond a plain import (an encoding found, columns dropped or renamed, a layout converted)."""
    _check_free(settings, name)
    file = Path(file).expanduser()
    mapped, src, stored, layout, rows, test, notes = _load(file, fmt, columns, encoding, split, test_split)
    extra = {"columns_mapped": mapped, "encoding": encoding or None, "split": src.split,
             "test_split": src.test_split}
    return _store(settings, name, stored, layout, rows, test, notes, source or str(file.resolve()), extra,
                  original=file if file.is_file() else None, db=db)


def _check_free(settings: Settings, name: str) -> None:
    """A new dataset's name: safe, and not taken."""
    check_name(name, "dataset")
    if _exists(settings, name):
        raise LabError(f"a dataset named {name!r} already exists", "pick another name, or see `lab datasets list`")


def add_rows(settings: Settings, name: str, rows: list[dict], fmt: str, source: str, db=None) -> dict:
    """Register rows the lab made (the preference pairs of rankings) as dataset `name`, validated like an imported
    file's, with no file in between; all or nothing, and with `db` inside the caller's open session (see `add`)."""
    _check_free(settings, name)
    loaded = sources.Loaded(rows=[dict(r) for r in rows], places=[f"row {i}" for i in range(1, len(rows) + 1)],
                            problems=[])
    stored, layout, kept, notes = prepare(loaded, fmt, {}, name)
    extra = {"columns_mapped": {}, "encoding": None, "split": None, "test_split": None}
    return _store(settings, name, stored, layout, kept, None, notes, source, extra, original=None, db=db)


def _store(settings: Settings, name: str, stored: str, layout: str, rows: list[dict], test: list[dict] | None,
           notes: list[str], source: str, extra: dict, *, original: Path | None, db) -> dict:
    """Write a validated dataset's folder and its row, all or nothing (see `add`)."""
    data = _jsonl_bytes(rows)
    fingerprint = hashlib.sha256(data).hexdigest()
    final = datasets_dir(settings) / name
    cols = columns_of(rows)
    meta = {"name": name, "format": stored, "columns": cols, "rows": len(rows), "fingerprint": fingerprint,
            "source": source, "layout": layout, "columns_mapped": extra["columns_mapped"],
            "encoding": extra["encoding"], "split": extra["split"], "test_split": extra["test_split"],
            "test_rows": len(test) if test is not None else None, "notes": notes}
    moved = False
    try:
        with nullcontext(db) if db is not None else session(settings) as s:
            with staging(final, "dataset", registered=lambda: _exists(settings, name)) as tmp:
                (tmp / DATA_FILE).write_bytes(data)
                if test is not None:
                    (tmp / TEST_FILE).write_bytes(_jsonl_bytes(test))
                if original is not None:
                    shutil.copyfile(original, tmp / f"original{original.suffix.lower()}")
                (tmp / "dataset.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
                s.add(Dataset(name=name, format=stored, path=str(final), columns=cols, rows=len(rows),
                              test_rows=meta["test_rows"], fingerprint=fingerprint, source=source))
                s.flush()  # a duplicate name fails here, before the folder is moved into place
            moved = True
    except Exception:
        if moved:  # the commit failed after the folder was moved: take it back out
            shutil.rmtree(final, ignore_errors=True)
        raise
    if db is not None:
        return {"name": name, "format": stored, "rows": len(rows), "notes": notes}
    return {**info(settings, name), "notes": notes}


def _info(row: Dataset) -> dict:
    return {"id": row.id, "name": row.name, "format": row.format, "rows": row.rows, "test_rows": row.test_rows,
            "columns": row.columns,
            "fingerprint": row.fingerprint, "path": row.path, "source": row.source, "job_id": row.job_id,
            "created_at": row.created_at.isoformat(timespec="seconds")}


def get(settings: Settings, name: str) -> Dataset:
    with read_session(settings) as s:
        row = s.scalar(select(Dataset).where(Dataset.name == name))
    if row is None:
        raise LabError(f"no dataset named {name!r}", "see `lab datasets list`, or add one with `lab datasets add`")
    return row


def info(settings: Settings, name: str) -> dict:
    return _info(get(settings, name))


def list_all(settings: Settings) -> list[dict]:
    with read_session(settings) as s:
        return [_info(r) for r in s.scalars(select(Dataset).order_by(Dataset.id))]


def iter_rows(path: str | Path, split: str = "train") -> Iterator[dict]:
    """The stored rows: `train` (what training reads) or `test` (the held-out split, when there is one)."""
    with open(Path(path) / (TEST_FILE if split == "test" else DATA_FILE), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def preview(settings: Settings, name: str, rows: int = 5, offset: int = 0) -> list[dict]:
    """Up to `rows` stored rows starting at `offset`."""
    out = []
    for i, row in enumerate(iter_rows(get(settings, name).path)):
        if i >= offset + rows:
            break
        if i >= offset:
            out.append(row)
    return out


def converted_rows(settings: Settings, name: str, to: str, limit: int | None = None, split: str = "train"
                   ) -> list[dict]:
    """Rows of dataset `name` converted to format `to` (see formats.CONVERSIONS), without storing anything."""
    info = get(settings, name)
    convert = formats.CONVERSIONS.get((info.format, to))
    if convert is None:
        known = ", ".join(f"{a} -> {b}" for a, b in formats.CONVERSIONS)
        raise LabError(f"no conversion from {info.format} to {to}", f"the lab converts {known}")
    out = []
    for i, row in enumerate(iter_rows(info.path, split)):
        if limit is not None and i >= limit:
            break
        out.append(convert(row))
    return out


def convert(settings: Settings, name: str, new_name: str, to: str) -> dict:
    """Store dataset `name` converted to format `to` as `new_name`; the result is validated like any import."""
    check_name(new_name, "dataset")
    held_out = get(settings, name).test_rows is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / new_name  # train.jsonl, and test.jsonl for a dataset that keeps a test split
        folder.mkdir()
        for split in ("train", "test") if held_out else ("train",):
            (folder / f"{split}.jsonl").write_bytes(_jsonl_bytes(converted_rows(settings, name, to, split=split)))
        return add(settings, new_name, folder, to, source=f"dataset {name} converted to {to}")


def append_rows(settings: Settings, name: str, rows: list[dict], db=None) -> dict:
    """Add validated rows to a stored dataset (the playground's rankings); the fingerprint and count follow.
    The database's write lock is held while the file is rewritten, so two appends never lose a row. With `db`, the
    caller's open session is used and the rows count only once it commits (see lab.ranking)."""
    from sqlalchemy import update

    stored = get(settings, name)
    problems = [f"new row {i}: {p}" for i, row in enumerate(rows, start=1)
                for p in formats.check_row(stored.format, row)]
    if problems:
        raise ValidationError(f"rows not valid for {name} ({stored.format}):", problems)
    folder = Path(stored.path)
    with (nullcontext(db) if db is not None else session(settings)) as s:
        s.execute(update(Dataset).where(Dataset.id == stored.id).values(rows=Dataset.rows))  # take the write lock
        stored = s.get(Dataset, stored.id)  # as of now, under the lock
        data = (folder / DATA_FILE).read_bytes() + _jsonl_bytes(rows)
        fingerprint = hashlib.sha256(data).hexdigest()
        columns = list(dict.fromkeys([*stored.columns, *columns_of(rows)]))
        tmp = folder / f".{DATA_FILE}.new"
        tmp.write_bytes(data)
        tmp.replace(folder / DATA_FILE)
        count = data.count(b"\n")
        meta = {"name": name, "format": stored.format, "columns": columns, "rows": count, "fingerprint": fingerprint,
                "source": stored.source}
        (folder / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        s.execute(update(Dataset).where(Dataset.id == stored.id).values(rows=count, fingerprint=fingerprint,
                                                                       columns=columns))
    return {"name": name, "rows": count, "fingerprint": fingerprint}
