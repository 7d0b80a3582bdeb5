"""Dataset formats: how each is recognised, what a valid row looks like, and the conversions between them.

| format            | columns                                   | used by                          |
|-------------------|-------------------------------------------|----------------------------------|
| chat              | messages: [{role, content}, ...]          | sft                              |
| alpaca            | instruction, input (optional), output     | sft                              |
| prompt_completion | prompt, completion (texts or messages)    | sft                              |
| preference        | chosen, rejected, prompt (optional)       | reward, dpo                      |
| classification    | text, label                               | classify                         |
| text              | text                                      | pretrain                         |
| candidates        | prompt, candidates: [{text, model, ...}]  | ranking (`lab rank`), eval-judge |

ShareGPT files (`conversations` of {from, value} turns) are an import layout: they are stored as `chat`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

FORMATS: dict[str, str] = {
    "chat": "conversations: `messages` is a list of {role, content} with at least one assistant turn",
    "alpaca": "instructions: `instruction`, optional `input`, `output`",
    "prompt_completion": "`prompt` and `completion`, both texts or both lists of {role, content} messages",
    "preference": "`chosen` and `rejected` replies, with an optional shared `prompt`",
    "classification": "`text` and its `label`",
    "text": "raw `text` for pretraining",
    "candidates": "a `prompt` and its `candidates`, a list of two or more answers ({text, model, ...}) to rank",
}
ROLES = ("system", "user", "assistant", "tool")
REQUIRED = {"chat": ("messages",), "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
            "preference": ("chosen", "rejected"), "classification": ("text", "label"), "text": ("text",),
            "candidates": ("prompt", "candidates"), "sharegpt": ("conversations",)}
OPTIONAL = {"alpaca": ("input",), "preference": ("prompt",), "candidates": ("id",), "sharegpt": ("system",)}
LAYOUTS = {"sharegpt": "ShareGPT: `conversations` is a list of {from, value} turns (human, gpt, system, ...); "
                       "stored as chat"}
FIELDS = tuple(dict.fromkeys(c for cols in (*REQUIRED.values(), *OPTIONAL.values()) for c in cols))


def fields_of(fmt: str) -> tuple[str, ...]:
    """The columns a format reads: the required ones, then the optional ones."""
    return REQUIRED[fmt] + OPTIONAL.get(fmt, ())


def detect(columns: Iterable[str]) -> str | None:
    """The format whose columns are present, most specific first; None when nothing fits."""
    cols = set(columns)
    if "messages" in cols:
        return "chat"
    if "conversations" in cols:
        return "sharegpt"
    if {"prompt", "candidates"} <= cols:
        return "candidates"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if {"text", "label"} <= cols:
        return "classification"
    if "text" in cols:
        return "text"
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(row: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> list[str]:
    if key not in row or row[key] is None:
        return [f"`{key}` is missing"] if required else []
    value = row[key]
    if not isinstance(value, str):
        return [f"`{key}` must be text, got {_type_name(value)}"]
    if not allow_empty and not value.strip():
        return [f"`{key}` is empty"]
    return []


def _messages(value: Any, key: str = "messages", need_assistant: bool = True) -> list[str]:
    if not isinstance(value, list) or not value:
        return [f"`{key}` must be a non-empty list of {{role, content}}, got {_type_name(value)}"]
    problems = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            problems.append(f"`{key}[{i}]` must be an object with role and content, got {_type_name(m)}")
        elif m.get("role") not in ROLES:
            problems.append(f"`{key}[{i}].role` must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        elif not isinstance(m.get("content"), str):
            problems.append(f"`{key}[{i}].content` must be text, got {_type_name(m.get('content'))}")
    if not problems and need_assistant and not any(m["role"] == "assistant" for m in value):
        problems.append(f"`{key}` has no assistant turn to learn from")
    return problems


def _reply(row: dict, key: str) -> list[str]:
    value = row.get(key)
    if isinstance(value, list):
        return _messages(value, key, need_assistant=False)
    return _text(row, key)


def _check_chat(row: dict) -> list[str]:
    if "messages" not in row:
        return ["`messages` is missing"]
    problems = _messages(row["messages"])
    if not problems and row["messages"][0]["role"] == "assistant" and len(row["messages"]) == 1:
        problems.append("`messages` has only an assistant turn: there is no prompt before it")
    return problems


def _check_alpaca(row: dict) -> list[str]:
    return _text(row, "instruction") + _text(row, "input", required=False, allow_empty=True) + _text(row, "output")


def _check_prompt_completion(row: dict) -> list[str]:
    kinds = {isinstance(row.get(k), list) for k in ("prompt", "completion")}
    if kinds == {True}:  # TRL's conversational form
        problems = _messages(row["prompt"], "prompt", need_assistant=False)
        problems += _messages(row["completion"], "completion")
        if not problems and row["completion"][0]["role"] != "assistant":
            problems.append("`completion` must start with an assistant turn")
        return problems
    if kinds == {True, False} and all(row.get(k) is not None for k in ("prompt", "completion")):
        return ["`prompt` and `completion` must both be texts or both lists of messages"]
    return _text(row, "prompt") + _text(row, "completion")


def _check_preference(row: dict) -> list[str]:
    problems = _reply(row, "chosen") + _reply(row, "rejected")
    if "prompt" in row and row["prompt"] is not None:
        problems += _reply(row, "prompt")
    if not problems and row["chosen"] == row["rejected"]:
        problems.append("`chosen` and `rejected` are the same")
    if not problems and row.get("prompt") is None and isinstance(row["chosen"], list) != isinstance(row["rejected"],
                                                                                                     list):
        problems.append("`chosen` and `rejected` must both be texts or both lists of messages")
    if not problems and row.get("prompt") is None and isinstance(row["chosen"], str) and split_transcripts(
            row["chosen"], row["rejected"]) is None:
        split = split_texts(row["chosen"], row["rejected"])
        if not split["prompt"]:
            problems.append("`chosen` and `rejected` share no leading words to use as the prompt, and there is no "
                            "`prompt`")
        elif not split["chosen"] or not split["rejected"]:
            problems.append("after the words `chosen` and `rejected` share, each needs a reply")
    if not problems and row.get("prompt") is None and isinstance(row["chosen"], list):
        shared = len(common_turns(row["chosen"], row["rejected"]))
        if shared == 0:
            problems.append("`chosen` and `rejected` share no leading turn to use as the prompt, and there is no "
                            "`prompt`")
        elif not any(m["role"] == "assistant" for m in row["chosen"][shared:]) or not any(
                m["role"] == "assistant" for m in row["rejected"][shared:]):
            problems.append("after the turns `chosen` and `rejected` share, each needs an assistant reply")
    return problems


def _check_classification(row: dict) -> list[str]:
    problems = _text(row, "text")
    label = row.get("label")
    if label is None or (isinstance(label, str) and not label.strip()):
        problems.append("`label` is missing")
    elif isinstance(label, bool) or not isinstance(label, (str, int)):
        problems.append(f"`label` must be text or a whole number, got {_type_name(label)}")
    return problems


def _check_text(row: dict) -> list[str]:
    return _text(row, "text")


MAX_CANDIDATES = 16


def _check_candidates(row: dict) -> list[str]:
    problems = _reply(row, "prompt")
    if isinstance(row.get("prompt"), list) and not problems and row["prompt"][-1]["role"] == "assistant":
        problems.append("`prompt` ends with an assistant turn: there is nothing left to answer")
    if "id" in row and not (isinstance(row["id"], (str, int)) and not isinstance(row["id"], bool)
                            and str(row["id"]).strip() and len(str(row["id"])) <= 128):
        problems.append(f"`id` must be a short text or number, got {_type_name(row['id'])}")
    found = row.get("candidates")
    if not isinstance(found, list) or not 2 <= len(found) <= MAX_CANDIDATES:
        size = f"{len(found)} of them" if isinstance(found, list) else _type_name(found)
        return problems + [f"`candidates` must be a list of 2 to {MAX_CANDIDATES} answers, got {size}"]
    for i, c in enumerate(found):
        if not isinstance(c, dict):
            problems.append(f"`candidates[{i}]` must be an object with `text`, got {_type_name(c)}")
        elif not isinstance(c.get("text"), str):
            problems.append(f"`candidates[{i}].text` must be text, got {_type_name(c.get('text'))}")
        elif c.get("model") is not None and not isinstance(c["model"], str):
            problems.append(f"`candidates[{i}].model` must be text, got {_type_name(c['model'])}")
    return problems


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}


def _turn(turn: Any) -> tuple[Any, Any]:
    """A ShareGPT turn's role and text: {from, value}, or {role, content} as some exports write them."""
    if not isinstance(turn, dict):
        return None, None
    return turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))


def _check_sharegpt(row: dict) -> list[str]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        return [f"`conversations` must be a non-empty list of {{from, value}} turns, got {_type_name(turns)}"]
    problems = []
    for i, turn in enumerate(turns):
        who, text = _turn(turn)
        if not isinstance(turn, dict):
            problems.append(f"`conversations[{i}]` must be an object with from and value, got {_type_name(turn)}")
        elif str(who).lower() not in SHAREGPT_ROLES:
            problems.append(f"`conversations[{i}].from` must be one of {', '.join(SHAREGPT_ROLES)}, got {who!r}")
        elif not isinstance(text, str):
            problems.append(f"`conversations[{i}].value` must be text, got {_type_name(text)}")
    if problems:
        return problems
    if row.get("system") is not None and not isinstance(row["system"], str):
        problems.append(f"`system` must be text, got {_type_name(row['system'])}")
    return problems or _check_chat(from_sharegpt(row))


def from_sharegpt(row: dict) -> dict:
    """A ShareGPT row as a chat row: `messages` with OpenAI roles, a top-level `system` first; other columns kept."""
    messages = [{"role": SHAREGPT_ROLES[str(_turn(t)[0]).lower()], "content": _turn(t)[1]}
                for t in row["conversations"]]
    if row.get("system"):
        messages.insert(0, {"role": "system", "content": row["system"]})
    rest = {k: v for k, v in row.items() if k not in ("conversations", "system", "messages")}
    return {**rest, "messages": messages}


CHECKS: dict[str, Callable[[dict], list[str]]] = {
    "chat": _check_chat,
    "alpaca": _check_alpaca,
    "prompt_completion": _check_prompt_completion,
    "preference": _check_preference,
    "classification": _check_classification,
    "text": _check_text,
    "candidates": _check_candidates,
    "sharegpt": _check_sharegpt,
}
STORED_AS = {"sharegpt": ("chat", from_sharegpt)}  # import layouts: the format they are kept in, and how


def object_problem(row: Any) -> str | None:
    """Why a row is not a row at all (not an object with named fields); None when it is one."""
    return None if isinstance(row, dict) else f"must be an object with named fields, got {_type_name(row)}"


def check_row(fmt: str, row: Any) -> list[str]:
    """What is wrong with one row in format `fmt` (an empty list when it is valid)."""
    if problem := object_problem(row):
        return [problem]
    return CHECKS[fmt](row)


# --- conversions ----------------------------------------------------------------------------------------------


def alpaca_to_prompt(row: dict) -> str:
    """The user turn of an alpaca row: the instruction, then the input (when there is one) after a blank line."""
    extra = (row.get("input") or "").strip()
    return row["instruction"].strip() + (f"\n\n{extra}" if extra else "")


def to_prompt_completion(fmt: str, row: dict) -> dict:
    """A conversational prompt/completion pair: the prompt turns, and the assistant reply that is learned.

    Chat rows learn their last assistant turn; the turns before it are the prompt.
    """
    if fmt == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": messages[last]["content"]}]}
    if fmt == "alpaca":
        user = alpaca_to_prompt(row)
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": row["output"]}],
        }
    if fmt == "prompt_completion" and isinstance(row["prompt"], list):
        return {"prompt": [{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
                "completion": [{"role": m["role"], "content": m["content"]} for m in row["completion"]]}
    if fmt == "prompt_completion":
        return {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "completion": [{"role": "assistant", "content": row["completion"]}],
        }
    raise ValueError(f"no conversion from {fmt} to prompt/completion")


def to_messages(fmt: str, row: dict) -> dict:
    """The whole conversation as `messages` (every token counts towards the loss)."""
    pair = to_prompt_completion(fmt, row)
    return {"messages": pair["prompt"] + pair["completion"]}


# --- preference pairs -------------------------------------------------------------------------------------------

TURN = re.compile(r"\n\n(Human|Assistant):")
ROLE_OF = {"Human": "user", "Assistant": "assistant"}


def transcript_to_messages(text: str) -> list[dict] | None:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' (the hh-rlhf style) as messages; None when the text has no turns.
    A trailing empty assistant turn (a prompt waiting for its reply) is dropped."""
    parts = TURN.split(text)
    if len(parts) < 3:
        return None
    messages = [{"role": ROLE_OF[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts) - 1, 2)]
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def split_transcripts(chosen: str, rejected: str) -> dict | None:
    """A chosen/rejected pair of whole transcripts split at the last assistant turn into one shared prompt and
    two replies; None when they do not share everything before that turn."""
    marker = "\n\nAssistant:"
    a, b = chosen.rfind(marker), rejected.rfind(marker)
    if a < 0 or b < 0 or chosen[: a + len(marker)] != rejected[: b + len(marker)]:
        return None
    return {"prompt": chosen[: a + len(marker)], "chosen": chosen[a + len(marker):].strip(),
            "rejected": rejected[b + len(marker):].strip()}


def split_texts(chosen: str, rejected: str) -> dict:
    """Two plain texts cut after the words they both begin with: the shared words are the prompt (empty when they
    share none)."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    if n < min(len(chosen), len(rejected)) or len(chosen) != len(rejected):
        cut = chosen[:n]
        n = max(cut.rfind(" "), cut.rfind("\n")) + 1 if not cut[-1:].isspace() else n
    return {"prompt": chosen[:n].strip(), "chosen": chosen[n:].strip(), "rejected": rejected[n:].strip()}


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, list):
        return value
    return transcript_to_messages(value) or [{"role": role, "content": value}]


def common_turns(a: list[dict], b: list[dict]) -> list[dict]:
    """The leading messages two conversations share (the implicit prompt of a conversational preference pair)."""
    shared = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared.append(x)
    return shared


def to_preference_pair(row: dict) -> dict:
    """A preference row in TRL's conversational form: prompt turns, and the chosen and rejected replies.
    Without a `prompt`, the pair's shared start is its prompt (TRL's implicit prompt): the leading turns two
    conversations share, the turns before the last assistant turn of two transcripts, or the words two plain texts
    begin with."""
    if row.get("prompt") is None and isinstance(row["chosen"], list):
        n = len(common_turns(row["chosen"], row["rejected"]))
        return {"prompt": row["chosen"][:n], "chosen": row["chosen"][n:], "rejected": row["rejected"][n:]}
    if row.get("prompt") is None and isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        row = split_transcripts(row["chosen"], row["rejected"]) or split_texts(row["chosen"], row["rejected"])
    reply = lambda v: v if isinstance(v, list) else [{"role": "assistant", "content": v}]  # noqa: E731
    return {"prompt": _as_messages(row["prompt"], "user"), "chosen": reply(row["chosen"]),
            "rejected": reply(row["rejected"])}


def prompt_of(fmt: str, row: dict) -> list[dict]:
    """The prompt turns of a row of any format that has one (for generation: GRPO, PPO, evaluation, generate)."""
    if fmt == "candidates":
        return row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    if fmt == "text":  # raw text as the prompt (a list of questions, say)
        return [{"role": "user", "content": row["text"]}]
    if fmt == "preference":
        pair = to_preference_pair(row)
        if "prompt" not in pair:
            raise ValueError("this preference row has no prompt to generate from")
        return pair["prompt"]
    return to_prompt_completion(fmt, row)["prompt"]


# --- explicit conversions (lab datasets convert) -----------------------------------------------------------------

def _text_of(fmt: str, row: dict) -> str:
    if fmt == "text":
        return row["text"]
    return "\n\n".join(m["content"] for m in to_messages(fmt, row)["messages"])


CONVERSIONS: dict[tuple[str, str], Callable[[dict], dict]] = {
    ("preference", "preference"): lambda r: r if r.get("prompt") is not None else to_preference_pair(r) if isinstance(
        r["chosen"], list) else split_transcripts(r["chosen"], r["rejected"]) or r,
    ("alpaca", "prompt_completion"): lambda r: {"prompt": alpaca_to_prompt(r), "completion": r["output"]},
    ("chat", "prompt_completion"): lambda r: {
        "prompt": "\n\n".join(m["content"] for m in to_prompt_completion("chat", r)["prompt"]),
        "completion": to_prompt_completion("chat", r)["completion"][0]["content"]},
    ("alpaca", "chat"): lambda r: to_messages("alpaca", r),
    ("prompt_completion", "chat"): lambda r: to_messages("prompt_completion", r),
    ("alpaca", "text"): lambda r: {"text": _text_of("alpaca", r)},
    ("chat", "text"): lambda r: {"text": _text_of("chat", r)},
    ("prompt_completion", "text"): lambda r: {"text": _text_of("prompt_completion", r)},
    ("classification", "text"): lambda r: {"text": r["text"]},
}
