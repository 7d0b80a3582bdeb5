"""Reading what a user already has: a data file (JSONL, JSON, CSV/TSV, Parquet, text) in its own encoding and CSV
dialect, a `save_to_disk` folder (a Dataset or a DatasetDict), or a folder of files laid out like a hub download
(`data/train-*.parquet`, `test.jsonl`, ...), one split to train on and a held-out test split when there is one.

Every row keeps the place a user would look for it ("line 7", "train-00001-of-00002.parquet row 3"), and problems
that stop a row from being read are collected, not raised, so that an import can name all of them at once.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.errors import LabError

SUFFIXES = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
    ".txt": "txt",
}
MAX_ROW_CHARS = 8 * 1024 * 1024  # one row (a JSONL line, a CSV record) longer than this is a broken file
TEST_SPLITS = ("test", "validation")  # a folder's held-out split, in this order of preference
METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}  # not rows
ENCODING_HINT = ("name the file's encoding: `--encoding latin-1` (or cp1252, shift_jis, ...) with `lab datasets "
                 "add`, the Encoding field on the Datasets page, or `encoding` in the upload_dataset API")


def _too_long(n: int, place: str) -> str:
    return (f"{place}: {n / 1e6:.1f} million characters in one row (the limit is {MAX_ROW_CHARS / 1e6:.1f} "
            "million): is the whole file on one line?")


@dataclass
class Loaded:
    """Rows read from a file, each with the place a user would look for it ("line 7", "row 3")."""

    rows: list[Any]
    places: list[str]
    problems: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class Source:
    """What a file or folder holds: the rows to train on, and the held-out test split when it has one."""

    name: str
    train: Loaded
    test: Loaded | None = None
    split: str | None = None
    test_split: str | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        return self.train.notes + (self.test.notes if self.test else [])


# --- bytes to text ---------------------------------------------------------------------------------------------

BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def _utf16_without_bom(raw: bytes) -> str | None:
    """UTF-16 saved without a byte-order mark: ASCII-heavy text has a zero byte in every other position."""
    head = raw[:4096]
    if len(head) < 4 or b"\0" not in head:
        return None
    even, odd = head[0::2].count(0), head[1::2].count(0)
    if odd > len(head) // 4 and even == 0:
        return "utf-16-le"
    if even > len(head) // 4 and odd == 0:
        return "utf-16-be"
    return None


# the first bytes of files people mistake for data
NOT_TEXT = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
            (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a zip archive (an Excel .xlsx file is one too)"),
            (b"\x1f\x8b", "a gzip archive"), (b"PAR1", "a Parquet file"),
            (b"SQLite format 3\x00", "an SQLite database"), (b"\x7fELF", "a program"))


def decode(raw: bytes, name: str, encoding: str | None = None) -> tuple[str, list[str]]:
    """The text of a file, and a note when it was not plain UTF-8. UTF-8 (with or without a BOM), UTF-16 and
    UTF-32 are recognised; anything else must be named with `encoding`."""
    notes = []
    if encoding:
        try:
            codec = codecs.lookup(encoding).name
        except LookupError:
            raise LabError(f"unknown encoding {encoding!r}", "e.g. utf-8, latin-1, cp1252, utf-16, shift_jis"
                           ) from None
    else:
        codec = next((c for bom, c in BOMS if raw.startswith(bom)), None) or _utf16_without_bom(raw) or "utf-8"
        if codec != "utf-8" and codec != "utf-8-sig":
            notes.append(f"read as {codec.upper()} (found from its bytes)")
    try:
        text = raw.decode("utf-8-sig" if codec in ("utf-8", "utf-8-sig") else codec)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        if encoding:
            raise LabError(f"{name} is not {encoding} text: byte 0x{raw[exc.start]:02x} on line {line} cannot be "
                           f"read as {encoding}", "check the encoding the file was saved in") from None
        kind = next((kind for magic, kind in NOT_TEXT if raw.startswith(magic)), None)
        if kind:
            raise LabError(f"{name} is not a text file: it looks like {kind}",
                           "export the data as JSONL, CSV, JSON, plain text or Parquet (a Parquet file needs the "
                           ".parquet ending, a zipped dataset folder .zip)") from None
        raise LabError(f"{name} is not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} is not UTF-8",
                       ENCODING_HINT) from None
    return text.removeprefix("\ufeff"), notes


# --- one file --------------------------------------------------------------------------------------------------


def _json_msg(exc: json.JSONDecodeError) -> str:
    """The decoder's words without a trailing "at" ("Unterminated string starting at"), which the place follows."""
    return exc.msg.removesuffix(" at")


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
            out.problems.append(f"line {n}: invalid JSON ({_json_msg(exc)} at column {exc.colno})")
        except RecursionError:
            out.problems.append(f"line {n}: JSON nested too deeply to be a row")
    return out


def _read_json(text: str) -> Loaded:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # one object per line, named .json
            return _read_jsonl(text)
        raise LabError(f"invalid JSON: {_json_msg(exc)} at line {exc.lineno}, column {exc.colno}") from None
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


DELIMITERS = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "bars"}


def _delimiter(text: str, suffix: str) -> str:
    """The CSV's delimiter: a tab for .tsv, else the candidate that its header line holds most often."""
    if suffix == ".tsv":
        return "\t"
    header = next(csv.reader(io.StringIO(text, newline="")), [""])  # the first record, quoted newlines and all
    line = ",".join(header)
    counts = {d: line.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def _read_csv(text: str, suffix: str = ".csv") -> Loaded:
    csv.field_size_limit(max(csv.field_size_limit(), MAX_ROW_CHARS))  # long texts are fine; whole files are not
    delimiter = _delimiter(text, suffix)
    records = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    out = Loaded([], [], [])
    try:
        header = next(records, None)
    except csv.Error as exc:
        raise LabError(f"unreadable CSV header: {exc}") from None
    if not header or not any(f.strip() for f in header):
        raise LabError("the CSV file has no header row", "the first line must name the columns, e.g. text,label")
    names = [f.strip() for f in header]
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise LabError(f"the CSV header repeats a column name: {', '.join(repeated)}")
    unnamed = {i: f"column_{i + 1}" for i, n in enumerate(names) if not n}
    names = [unnamed.get(i, n) for i, n in enumerate(names)]
    if delimiter != ",":
        out.notes.append(f"columns separated by {DELIMITERS[delimiter]}")
    used: set[str] = set()
    try:
        for i, fields in enumerate(records, start=1):
            place = f"row {i} (line {records.line_num})"
            if not fields or (len(fields) == 1 and not fields[0].strip() and len(names) > 1):
                continue  # a blank line
            if len(fields) > len(names):
                out.problems.append(f"{place}: {len(fields)} fields, but the header has {len(names)}")
                continue
            if len(fields) < len(names) and any(n not in unnamed.values() for n in names[len(fields):]):
                out.problems.append(f"{place}: fewer fields than the header's {len(names)}")
                continue
            if (size := sum(len(v) for v in fields)) > MAX_ROW_CHARS:
                out.problems.append(_too_long(size, place))
                continue
            row = dict(zip(names, fields + [""] * (len(names) - len(fields)), strict=True))
            used.update(n for n in unnamed.values() if row[n].strip())
            out.rows.append(row)
            out.places.append(place)
    except csv.Error as exc:
        raise LabError(f"unreadable CSV at line {records.line_num}: {exc}") from None
    empty = [n for n in unnamed.values() if n not in used]
    for row in out.rows:
        for n in empty:
            del row[n]
    if empty:
        out.notes.append(f"{len(empty)} header column{'s' if len(empty) > 1 else ''} without a name and without "
                         "data dropped")
    if kept := [n for n in unnamed.values() if n in used]:
        out.notes.append(f"header columns without a name but with data kept as {', '.join(kept)}")
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


def read_file(path: Path, encoding: str | None = None) -> Loaded:
    """Rows of one data file, with file-level errors raised and per-row parse problems collected."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LabError(
            f"unsupported file type {path.suffix or '(none)'!r} for {path.name}",
            f"use one of {', '.join(SUFFIXES)}, a dataset folder, or a zipped one (.zip)",
        )
    if not path.is_file():
        raise LabError(f"no such file: {path}")
    if path.stat().st_size == 0:
        raise LabError(f"{path.name} is empty")
    if kind == "parquet":
        return _read_parquet(path)
    text, notes = decode(path.read_bytes(), path.name, encoding)
    if kind == "csv":
        loaded = _read_csv(text, path.suffix.lower())
    else:
        loaded = {"jsonl": _read_jsonl, "json": _read_json, "txt": _read_txt}[kind](text)
    loaded.notes[:0] = notes
    return loaded


# --- folders ---------------------------------------------------------------------------------------------------


def _from_disk(path: Path) -> dict[str, Loaded]:
    """The splits of a `save_to_disk` folder (one split, `train`, for a Dataset)."""
    from datasets import Dataset, load_from_disk

    try:
        found = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise LabError(f"{path.name} looks like a save_to_disk folder but cannot be read: {exc}") from None
    splits = {"train": found} if isinstance(found, Dataset) else dict(found)
    return {name: Loaded(d.to_list(), [f"row {i}" for i in range(1, d.num_rows + 1)], [])
            for name, d in splits.items()}


def _split_files(path: Path) -> dict[str, list[Path]]:
    """A folder's data files per split, named the way hub datasets name them (the `datasets` library's rules)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
        found = DataFilesDict.from_patterns(patterns, base_path=str(path), allowed_extensions=list(SUFFIXES))
    except Exception:  # datasets' "no data files" errors
        return {}
    out = {}
    for split, files in found.items():
        kept = sorted(Path(f) for f in files if Path(f).name not in METADATA)
        if kept:
            out[str(split)] = kept
    return out


def _join(files: list[Path], encoding: str | None) -> Loaded:
    out = Loaded([], [], [])
    for f in files:
        part = read_file(f, encoding)
        prefix = f"{f.name} " if len(files) > 1 else ""
        out.rows += part.rows
        out.places += [prefix + p for p in part.places]
        out.problems += [prefix + p for p in part.problems]
        out.notes += [n for n in part.notes if n not in out.notes]
    return out


def _pick(splits: list[str], split: str | None, test_split: str | None, where: str) -> tuple[str, str | None]:
    if split is None:
        split = "train" if "train" in splits else splits[0] if len(splits) == 1 else None
        if split is None:
            raise LabError(f"{where} has the splits {', '.join(splits)} and none is called train",
                           "pick the one to train on with --split NAME (the Split field on the Datasets page)")
    elif split not in splits:
        raise LabError(f"{where} has no split {split!r}", f"its splits are {', '.join(splits)}")
    if test_split is None:
        test_split = next((s for s in TEST_SPLITS if s in splits and s != split), None)
    elif test_split in ("", "none"):
        test_split = None
    elif test_split not in splits:
        raise LabError(f"{where} has no split {test_split!r} to hold out", f"its splits are {', '.join(splits)}")
    if test_split == split:
        raise LabError(f"the split {split!r} cannot be both trained on and held out for testing")
    return split, test_split


MAX_UNZIPPED = 4 * 1024**3  # a zipped dataset folder larger than this when unpacked is refused


def _unzip(path: Path, into: Path) -> Path:
    """A zipped dataset folder unpacked into `into` (the folder itself when the zip holds one top folder).
    Members that would land outside it, links and archives that unpack past MAX_UNZIPPED are refused."""
    import zipfile

    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise LabError(f"{path.name} is not a readable zip file") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if sum(m.file_size for m in members) > MAX_UNZIPPED:
            raise LabError(f"{path.name} unpacks to more than {MAX_UNZIPPED / 1024**3:.0f} GiB",
                           "import the folder from the command line: lab datasets add NAME FOLDER")
        for m in members:
            target = (into / m.filename).resolve()
            if not target.is_relative_to(into.resolve()) or (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise LabError(f"{path.name} holds {m.filename!r}, which would unpack outside its folder")
        archive.extractall(into, members)
    tops = [p for p in into.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else into


def read(path: str | Path, *, encoding: str | None = None, split: str | None = None,
         test_split: str | None = None) -> Source:
    """What a file or a dataset folder (or a zipped one) holds. `split` picks the split to train on (default:
    `train`, or the only one); `test_split` the held-out one (default: `test`, else `validation`, when present;
    "none" for none)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LabError(f"no such file or folder: {path}")
    if path.is_file() and path.suffix.lower() == ".zip":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            found = read(_unzip(path, Path(tmp)), encoding=encoding, split=split, test_split=test_split)
        found.name, found.files = path.name, [path]
        return found
    if not path.is_dir():
        if split not in (None, "", "train") or test_split not in (None, "", "none"):
            raise LabError(f"{path.name} is one file: it has no splits to pick",
                           "--split and --test-split go with a dataset folder")
        loaded = read_file(path, encoding)
        if not loaded.rows and not loaded.problems:
            raise LabError(f"{path.name} holds no rows")
        return Source(path.name, loaded, files=[path])
    where = f"the folder {path.name}"
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        splits = _from_disk(path)
        files: dict[str, list[Path]] = {}
    else:
        files = _split_files(path)
        if not files:
            raise LabError(f"{where} holds no data files",
                           f"expected {', '.join(SUFFIXES)} files (one per split, e.g. train.jsonl and test.jsonl, "
                           "or data/train-00000-of-00001.parquet shards), or a folder written by save_to_disk")
        splits = {}
    names = list(splits or files)
    split, test_split = _pick(names, split or None, test_split, where)
    chosen = {s: splits[s] if splits else _join(files[s], encoding) for s in (split, test_split) if s}
    for s, loaded in chosen.items():
        if not loaded.rows and not loaded.problems:
            raise LabError(f"the split {s!r} of {where} holds no rows")
    if len(names) > 1:
        others = [s for s in names if s not in chosen]
        chosen[split].notes.insert(0, f"split {split!r} to train on" + (
            f", {test_split!r} held out for evaluation" if test_split else "") + (
            f" ({', '.join(others)} not imported)" if others else ""))
    return Source(path.name, chosen[split], chosen.get(test_split) if test_split else None, split, test_split,
                  [f for s in chosen for f in files.get(s, [])])
