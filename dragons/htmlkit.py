"""The one HTML kit of dragons' pages: the training and evaluation report
(dragons.report), a run's morning report (dragons.score.runreport) and the
compare report (dragons.loop.comparereport).

Text is escaped unless it is :class:`Markup`, which only this kit makes: class
names, URIs, run ids and error messages come from users' folders, buckets and
tables, and a page must show ``<script>`` as text. So a page is built from
``esc``-aped text and kit-made fragments, and a new table cell is safe by
default, not by the caller remembering to escape it.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import quote


class Markup(str):
    """HTML that goes into a page as it is: made by this kit from escaped parts."""


def esc(value: Any) -> Markup:
    """``value`` as text in a page: escaped, unless it is already :class:`Markup`."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(str(value)))


def tag(name: str, content: Any = "", **attrs: Any) -> Markup:
    """``<name attr="...">content</name>``: attributes and text content escaped
    (``class_`` for ``class``; a ``None`` attribute is left out)."""
    at = "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in attrs.items() if v is not None)
    return Markup(f"<{name}{at}>{esc(content)}</{name}>")


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    """Fragments and text joined, the text escaped."""
    return Markup(sep.join(esc(p) for p in parts))


def img(src: str, alt: str, **attrs: Any) -> Markup:
    """An ``<img>`` of a file beside the page (``src`` relative, URL-quoted)."""
    at = "".join(f' {k.replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    return Markup(f'<img src="{esc(quote(src, safe="/"))}" alt="{esc(alt)}"{at}>')


def table(
    header: Sequence[Any], rows: Iterable[Sequence[Any]], text_cols: Sequence[int] = (), fmt: Any = str
) -> Markup:
    """A ``<table>``: every cell escaped (kit-made Markup kept); ``fmt`` turns a
    non-Markup value into text (e.g. floats to 4 places); ``text_cols`` get ``class="text"``."""

    def cell(t: str, j: int, v: Any) -> str:
        value = v if isinstance(v, Markup) else esc(fmt(v))
        return f'<{t} class="text">{value}</{t}>' if j in text_cols else f"<{t}>{value}</{t}>"

    head = "".join(cell("th", j, h) for j, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", j, v) for j, v in enumerate(row)) + "</tr>" for row in rows)
    return Markup(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def page(title: str, body: Iterable[Any], css: str = "", script: str = "") -> str:
    """A self-contained page (inline CSS and script, links relative) with ``title`` as its title and heading."""
    head = '<meta charset="utf-8"><meta name="viewport" content="width=device-width">'
    head += f"<title>{esc(title)}</title><style>{css}</style>" + (f"<script>{script}</script>" if script else "")
    parts = ["<!DOCTYPE html>", f'<html lang="en"><head>{head}</head><body>', f"<h1>{esc(title)}</h1>"]
    parts += [esc(p) for p in body]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
