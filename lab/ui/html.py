"""The one place where the page's HTML is built from text. Everything a user or a file wrote (names, notes, cells,
problem lists, errors, logs) goes through `text` (or `md` for Markdown components), so it shows literally and
never runs as markup or script."""

from __future__ import annotations

from html import escape

STATUS_COLOURS = {"queued": "#6b7280", "running": "#2563eb", "completed": "#059669", "failed": "#dc2626",
                  "cancelled": "#d97706"}


def text(value: object) -> str:
    """Any value as HTML text: escaped, line breaks kept."""
    return escape("" if value is None else str(value), quote=True).replace("\n", "<br>")


def md(value: object) -> str:
    """Any value as literal text inside a Markdown component: HTML and Markdown's own marks are escaped."""
    out = escape("" if value is None else str(value), quote=True)
    for mark in "\\`*_[]#|~":
        out = out.replace(mark, "\\" + mark)
    return out


def tag(name: str, content: str = "", cls: str | None = None, title: str | None = None) -> str:
    """<name class=... title=...>content</name>; `content` must already be HTML (from `text` or `tag`)."""
    attrs = (f' class="{escape(cls)}"' if cls else "") + (f' title="{escape(title)}"' if title is not None else "")
    return f"<{name}{attrs}>{content}</{name}>"


def box(kind: str, message: str, items: list[str] | None = None, footer: str | None = None,
        more: int = 0) -> str:
    """An error or ok box: a message, an optional list of items (e.g. bad rows) and a closing line; all text."""
    body = tag("b", text(message)) if items else text(message)
    if items:
        lines = [tag("li", text(i)) for i in items]
        if more:
            lines.append(tag("li", text(f"... and {more} more")))
        body += tag("ul", "".join(lines))
    if footer:
        body += text(footer)
    return tag("div", body, cls=f"{kind}-box")


def error_box(message: str, items: list[str] | None = None, footer: str | None = None, more: int = 0) -> str:
    return box("error", message, items, footer, more)


def ok_box(message: str) -> str:
    return box("ok", message)


def problems_box(exc, footer: str) -> str:
    """A LabError as an error box; a ValidationError with its problems as a list (the first MAX_SHOWN)."""
    problems = getattr(exc, "problems", None)
    if problems is None:
        return error_box(f"{exc}\n{footer}")
    shown = problems[: exc.MAX_SHOWN]
    return error_box(exc.summary, shown, footer, more=len(problems) - len(shown))


def badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#6b7280")
    return f'<span class="badge" style="background:{colour}">{text(status)}</span>'
