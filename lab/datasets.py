"""Datasets: read a JSONL, JSON, CSV, Parquet or text file, detect its format, validate every row, store it.

A dataset is stored as `workspace/datasets/<name>/` with `data.jsonl` (the rows, normalised), the original file,
and `dataset.json` (format, columns, rows, fingerprint). Nothing is stored or registered unless every row is valid.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from lab import formats
from lab.db import read_session, session
from lab.errors import LabError, ValidationError
from lab.settings import Settings
from lab.tables import Dataset
from lab.workspace import check_name, datasets_dir, staging

SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "txt",
}
DATA_FILE = "data.jsonl"
MAX_ROW_CHARS = 8 * 1024 * 1024  # one row (a JSONL line, a CSV record) longer than this is a broken file


def _too_long(n: int, place: str) -> str:
    return (f"{place}: {n / 1e6:.1f} million characters in one row (the limit is {MAX_ROW_CHARS / 1e6:.1f} "
            "million): is the whole file on one line?")


@dataclass
class Loaded:
    """Rows read from a file, each with the place a user would look for it ("line 7", "row 3")."""

    rows: list[Any]
    places: list[str]
    problems: list[str]


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LabError(
            f"{path.name} is not UTF-8 text: undecodable byte 0x{raw[exc.start]:02x} on line {line}",
            "save the file as UTF-8",
        ) from None


def _read_jsonl(text: str) -> Loaded:
    out = Loaded([], [], [])
    # JSON lines end at "\n" only: str.splitlines() would also cut at U+2028, U+2029 and U+0085, which
    # json.dumps(ensure_ascii=False) writes inside strings
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if len(line) > MAX_ROW_CHARS:
            out.problems.append(_too_long(len(line), f"line {n}"))
            continue
        try:
            out.rows.append(json.loads(line))
            out.places.append(f"line {n}")
        except json.JSONDecodeError as exc:
            out.problems.append(f"line {n}: invalid JSON ({exc.msg} at column {exc.colno})")
        except RecursionError:
            out.problems.append(f"line {n}: JSON nested too deeply to be a row")
    return out


def _read_json(text: str) -> Loaded:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabError(f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except RecursionError:
        raise LabError("the JSON is nested too deeply to be a table of rows") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise LabError("a JSON file must hold a list of rows, or an object with exactly one list of rows")
        data = lists[0]
    if not isinstance(data, list):
        raise LabError(f"a JSON file must hold a list of rows, got {type(data).__name__}")
    return Loaded(data, [f"row {i}" for i in range(1, len(data) + 1)], [])


_EXTRA = "\0extra"  # where csv.DictReader puts the fields of a row longer than the header


def _read_csv(text: str) -> Loaded:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_CHARS))  # long texts are fine; whole files are not
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey=_EXTRA, restval=None)
    out = Loaded([], [], [])
    if not reader.fieldnames or not any(f.strip() for f in reader.fieldnames):
        raise LabError("the CSV file has no header row", "the first line must name the columns, e.g. text,label")
    if len(set(reader.fieldnames)) != len(reader.fieldnames):
        raise LabError(f"the CSV header repeats a column name: {', '.join(reader.fieldnames)}")
    try:
        for i, row in enumerate(reader, start=1):
            place = f"row {i} (line {reader.line_num})"
            if _EXTRA in row:
                fields = len(reader.fieldnames) + len(row[_EXTRA])
                out.problems.append(f"{place}: {fields} fields, but the header has {len(reader.fieldnames)}")
                continue
            if any(v is None for v in row.values()):
                out.problems.append(f"{place}: fewer fields than the header's {len(reader.fieldnames)}")
                continue
            if (size := sum(len(v) for v in row.values())) > MAX_ROW_CHARS:
                out.problems.append(_too_long(size, place))
                continue
            out.rows.append(row)
            out.places.append(place)
    except csv.Error as exc:
        raise LabError(f"unreadable CSV at line {reader.line_num}: {exc}") from None
    return out


def _read_parquet(path: Path) -> Loaded:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise LabError(f"{path.name} is not a readable Parquet file: {exc}") from None
    return Loaded(rows, [f"row {i}" for i in range(1, len(rows) + 1)], [])


def _read_txt(text: str) -> Loaded:
    """Plain text becomes `text` rows, one per paragraph (blocks separated by blank lines)."""
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    rows = [{"text": p} for p in paragraphs if p.strip()]
    return Loaded(rows, [f"paragraph {i}" for i in range(1, len(rows) + 1)], [])


def read_file(path: Path) -> Loaded:
    """Rows of a dataset file, with file-level errors raised and per-row parse problems collected."""
    path = Path(path)
    if path.is_dir():
        raise LabError(f"{path} is a folder", "give one data file (.jsonl, .json, .csv, .parquet or .txt)")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LabError(
            f"unsupported file type {path.suffix or '(none)'!r} for {path.name}",
            f"use one of {', '.join(SUFFIXES)}",
        )
    if not path.is_file():
        raise LabError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise LabError(f"{path.name} is empty")
    if kind == "parquet":
        loaded = _read_parquet(path)
    else:
        text = _decode(path.read_bytes(), path)
        loaded = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "txt": _read_txt}[kind](text)
    if not loaded.rows and not loaded.problems:
        raise LabError(f"{path.name} holds no rows")
    return loaded


def columns_of(rows: list[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            seen.update(dict.fromkeys(row))
    return list(seen)


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


def validate(loaded: Loaded, fmt: str | None, name: str) -> tuple[str, list[str]]:
    """The format (given or detected) and the columns; raises ValidationError listing every bad row."""
    not_objects = [f"{place}: {problem}" for row, place in zip(loaded.rows, loaded.places, strict=True)
                   if (problem := formats.object_problem(row))]
    if not_objects:
        raise ValidationError(f"{name} is not a table of rows ({len(not_objects)} problems):",
                              loaded.problems + not_objects)
    columns = columns_of(loaded.rows)
    if fmt is None:
        fmt = formats.detect(columns)
        if fmt is None and loaded.problems:  # unreadable lines first: they may be why no format shows
            raise ValidationError(f"{name} could not be read ({len(loaded.problems)} problems):", loaded.problems)
        if fmt is None:
            raise LabError(
                f"cannot tell the format of {name}: its columns are {', '.join(columns) or '(none)'}",
                "expected one of: " + "; ".join(f"{k} ({v})" for k, v in formats.FORMATS.items()),
            )
    elif fmt not in formats.FORMATS:
        raise LabError(f"unknown format {fmt!r}", f"choose one of {', '.join(formats.FORMATS)}")
    problems = list(loaded.problems)
    for row, place in zip(loaded.rows, loaded.places, strict=True):
        problems += [f"{place}: {p}" for p in formats.check_row(fmt, row)]
    if fmt == "classification" and not problems:
        problems += _label_types(loaded.rows, loaded.places)
    if problems:
        raise ValidationError(f"{name} is not a valid {fmt} dataset ({len(problems)} problems):", problems)
    return fmt, columns


def _jsonl_bytes(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def _exists(settings: Settings, name: str) -> bool:
    with read_session(settings) as s:
        return s.scalar(select(Dataset.id).where(Dataset.name == name)) is not None


def add(settings: Settings, name: str, file: str | Path, fmt: str | None = None, source: str | None = None) -> dict:
    """Validate `file` and register it as dataset `name`; all or nothing. `source` says where it came from."""
    check_name(name, "dataset")
    file = Path(file).expanduser()
    if _exists(settings, name):
        raise LabError(f"a dataset named {name!r} already exists", "pick another name, or see `lab datasets list`")
    loaded = read_file(file)
    fmt, columns = validate(loaded, fmt, file.name)
    data = _jsonl_bytes(loaded.rows)
    fingerprint = hashlib.sha256(data).hexdigest()
    final = datasets_dir(settings) / name
    source = source or str(file.resolve())
    meta = {"name": name, "format": fmt, "columns": columns, "rows": len(loaded.rows), "fingerprint": fingerprint,
            "source": source}
    moved = False
    try:
        with session(settings) as s:
            with staging(final, "dataset", registered=lambda: _exists(settings, name)) as tmp:
                (tmp / DATA_FILE).write_bytes(data)
                shutil.copyfile(file, tmp / f"original{file.suffix.lower()}")
                (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
                s.add(Dataset(name=name, format=fmt, path=str(final), columns=columns, rows=len(loaded.rows),
                              fingerprint=fingerprint, source=source))
                s.flush()  # a duplicate name fails here, before the folder is moved into place
            moved = True
    except Exception:
        if moved:  # the commit failed after the folder was moved: take it back out
            shutil.rmtree(final, ignore_errors=True)
        raise
    return info(settings, name)


def _info(row: Dataset) -> dict:
    return {"id": row.id, "name": row.name, "format": row.format, "rows": row.rows, "columns": row.columns,
            "fingerprint": row.fingerprint, "path": row.path, "source": row.source,
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


def iter_rows(path: str | Path) -> Iterator[dict]:
    with open(Path(path) / DATA_FILE, encoding="utf-8") as f:
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


def converted_rows(settings: Settings, name: str, to: str, limit: int | None = None) -> list[dict]:
    """Rows of dataset `name` converted to format `to` (see formats.CONVERSIONS), without storing anything."""
    info = get(settings, name)
    convert = formats.CONVERSIONS.get((info.format, to))
    if convert is None:
        known = ", ".join(f"{a} -> {b}" for a, b in formats.CONVERSIONS)
        raise LabError(f"no conversion from {info.format} to {to}", f"the lab converts {known}")
    out = []
    for i, row in enumerate(iter_rows(info.path)):
        if limit is not None and i >= limit:
            break
        out.append(convert(row))
    return out


def convert(settings: Settings, name: str, new_name: str, to: str) -> dict:
    """Store dataset `name` converted to format `to` as `new_name`; the result is validated like any import."""
    check_name(new_name, "dataset")
    rows = converted_rows(settings, name, to)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{new_name}.jsonl"
        path.write_bytes(_jsonl_bytes(rows))
        return add(settings, new_name, path, to, source=f"dataset {name} converted to {to}")


def append_rows(settings: Settings, name: str, rows: list[dict]) -> dict:
    """Add validated rows to a stored dataset (the playground's rankings); the fingerprint and count follow.
    The database's write lock is held while the file is rewritten, so two appends never lose a row."""
    from sqlalchemy import update

    stored = get(settings, name)
    problems = [f"new row {i}: {p}" for i, row in enumerate(rows, start=1)
                for p in formats.check_row(stored.format, row)]
    if problems:
        raise ValidationError(f"rows not valid for {name} ({stored.format}):", problems)
    folder = Path(stored.path)
    with session(settings) as s:
        s.execute(update(Dataset).where(Dataset.id == stored.id).values(rows=Dataset.rows))  # take the write lock
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
    return info(settings, name)
