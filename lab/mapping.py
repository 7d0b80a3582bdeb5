"""Column mapping: which of a file's columns is which field of a format (`text=v2,label=v1`, target=source), as the
user gives it, or as the lab suggests it for a file whose columns almost fit a format."""

from __future__ import annotations

import re
from typing import Any

from lab import formats
from lab.errors import LabError

SYNTAX = "target=source pairs separated by commas, e.g. text=sms,label=category"

# names people give the columns of each field, beyond the field's own name
ALIASES = {
    "prompt": ("question", "query", "input", "instruction", "problem", "prompt_text", "user", "context"),
    "completion": ("answer", "response", "output", "reply", "solution", "target_text", "assistant", "completion_text"),
    "text": ("sms", "message", "sentence", "content", "body", "review", "document", "comment", "tweet", "email",
             "headline", "title", "passage", "utterance", "v2"),
    "label": ("labels", "class", "category", "target", "sentiment", "tag", "y", "v1", "is_spam", "spam"),
}


def parse(spec: str | dict | None) -> dict[str, str]:
    """A mapping given as text (`text=v2,label=v1`) or as a dict, checked: known targets, each given once."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        pairs = [(str(k).strip(), str(v).strip()) for k, v in spec.items()]
    else:
        pairs = []
        for part in (p.strip() for p in str(spec).split(",")):
            if not part:
                continue
            target, eq, source = part.partition("=")
            if not eq or not target.strip() or not source.strip():
                raise LabError(f"cannot read the column mapping {part!r}", f"write {SYNTAX}")
            pairs.append((target.strip(), source.strip()))
    out: dict[str, str] = {}
    for target, source in pairs:
        if target not in formats.FIELDS:
            raise LabError(f"{target!r} is not a field any format reads",
                           f"map to one of {', '.join(formats.FIELDS)} ({SYNTAX})")
        if target in out:
            raise LabError(f"the column mapping names {target!r} twice")
        out[target] = source
    return out


def describe(mapping: dict[str, str]) -> str:
    return ",".join(f"{t}={s}" for t, s in mapping.items())


def apply(rows: list[Any], mapping: dict[str, str], columns: list[str], name: str) -> list[str]:
    """Rename the mapped columns of every row in place (a mapped column replaces a column of the target's name;
    the rest are kept); notes on what was replaced. A source the file does not have is an error."""
    if not mapping:
        return []
    missing = [s for s in mapping.values() if s not in columns]
    if missing:
        raise LabError(f"{name} has no column {', '.join(repr(m) for m in missing)} to map",
                       f"its columns are {', '.join(columns) or '(none)'}")
    sources = set(mapping.values())
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            kept = {k: v for k, v in row.items() if k not in sources and k not in mapping}
            rows[i] = {**kept, **{t: row.get(s) for t, s in mapping.items()}}
    replaced = [t for t, s in mapping.items() if t in columns and t != s and t not in sources]
    return [f"the file's own `{t}` column is replaced by `{mapping[t]}`" for t in replaced]


# --- suggestions for near misses ------------------------------------------------------------------------------


def _norm(column: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_")


def _named(columns: list[str], field: str, taken: set[str]) -> str | None:
    for c in columns:
        if c not in taken and (_norm(c) == field or _norm(c) in ALIASES.get(field, ())):
            return c
    return None


def _strings(rows: list[Any], column: str) -> list[str]:
    return [r[column] for r in rows[:500] if isinstance(r, dict) and isinstance(r.get(column), (str, int))
            and not isinstance(r.get(column), bool)]


def label_like(rows: list[Any], column: str) -> bool:
    """Few distinct short values: what a label column looks like."""
    values = [str(v).strip() for v in _strings(rows, column)]
    distinct = set(values)
    return len(values) >= 2 and 2 <= len(distinct) <= max(2, min(50, len(values) // 2)) and all(
        len(v) <= 40 for v in distinct)


def _mean_length(rows: list[Any], column: str) -> float:
    values = [v for v in _strings(rows, column) if isinstance(v, str)]
    return sum(map(len, values)) / len(values) if values else 0.0


def suggest(columns: list[str], rows: list[Any]) -> tuple[str, dict[str, str]] | None:
    """A format and the mapping that would make the file fit it, for columns that almost fit one; None when
    nothing close is found."""
    columns = [c for c in columns if c]
    chosen = next((c for c in columns if "chosen" in _norm(c) or _norm(c) in ("preferred", "better", "winner")),
                  None)
    rejected = next((c for c in columns if "rejected" in _norm(c) or _norm(c) in ("dispreferred", "worse", "loser")),
                    None)
    if chosen and rejected and chosen != rejected:
        mapping = {"chosen": chosen, "rejected": rejected}
        if prompt := _named(columns, "prompt", {chosen, rejected}):
            mapping["prompt"] = prompt
        return "preference", mapping
    prompt = _named(columns, "prompt", set())
    completion = _named(columns, "completion", {prompt} if prompt else set())
    if prompt and completion:
        return "prompt_completion", {"prompt": prompt, "completion": completion}
    label = _named(columns, "label", set())
    if label is None or not label_like(rows, label):
        label = next((c for c in columns if label_like(rows, c)), None)
    taken = {label} if label else set()
    text = _named(columns, "text", taken)
    if text is None:
        longest = sorted((c for c in columns if c not in taken), key=lambda c: _mean_length(rows, c), reverse=True)
        text = next((c for c in longest if _mean_length(rows, c) > 0), None)
    if text and label:
        return "classification", {"text": text, "label": label}
    if text:
        return "text", {"text": text}
    return None


def hint(fmt: str, mapping: dict[str, str]) -> str:
    """How to import with a suggested mapping, in the CLI's and the page's words."""
    renamed = {t: s for t, s in mapping.items() if t != s}
    return (f"it looks like {fmt}: import it with `--columns {describe(renamed)}` (lab datasets add), or map the "
            "columns on the Datasets page")
