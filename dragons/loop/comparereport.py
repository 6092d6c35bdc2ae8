"""``dragons compare``'s page: the two models side by side, per class, the McNemar test
in words, and thumbnails of the images where they disagree.

Thumbnails are small JPEGs written beside the page (``thumbs/``), linked
relatively as dragons.report's PNGs are, so the folder can be copied or synced
as a unit. Every text cell goes through ``html.escape``: class names and URIs
come from users' folders and tables.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any
from urllib.parse import quote

from PIL import Image

from dragons import storage
from dragons.errors import DragonsError
from dragons.images import ImageError, decode_to_base
from dragons.loop.compare import CompareResult, Disagreement

THUMB_SIDE = 160  # px: ~6 cards a row at 1200 px
THUMB_DIR = "thumbs"
KINDS = (
    ("b_right", "B right, A wrong"),
    ("a_right", "A right, B wrong"),
    ("both_wrong", "Both wrong, with different predictions"),
)
MAX_UNREADABLE_SHOWN = 20


def _by_kind(result: CompareResult) -> dict[str, list[Disagreement]]:
    """Each kind's disagreements, the most confident first (the surest mistakes teach most)."""
    groups: dict[str, list[Disagreement]] = {k: [] for k, _ in KINDS}
    for d in result.disagreements:
        groups[d.kind].append(d)
    for items in groups.values():
        items.sort(key=lambda d: (-max(d.p_a, d.p_b), d.uri))
    return groups


def write_thumbnails(result: CompareResult, out: str, per_kind: int) -> dict[str, str]:
    """Up to ``per_kind`` thumbnails of each kind of disagreement under ``out/thumbs``;
    returns uri -> path relative to the page (an image that no longer reads has none)."""
    written: dict[str, str] = {}
    for items in _by_kind(result).values():
        for d in items[:per_kind]:
            try:
                square = decode_to_base(storage.read_bytes(d.uri), THUMB_SIDE)
            except (ImageError, DragonsError):
                continue  # it decoded for scoring moments ago; the page says "no thumbnail"
            buf = io.BytesIO()
            Image.fromarray(square).save(buf, format="JPEG", quality=85)
            name = f"{THUMB_DIR}/{len(written):05d}.jpg"
            storage.write_bytes(storage.join(out, name), buf.getvalue())
            written[d.uri] = name
    return written


_CSS = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1160px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
td.text, th.text { text-align: left; word-break: break-all; max-width: 420px; }
.verdict { font-size: 1.2em; padding: 0.6em 1em; border-radius: 4px; }
.beats { background: #e3f4e1; border: 1px solid #7bbf72; }
.not { background: #f4ecdf; border: 1px solid #c9a66b; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(172px, 1fr)); gap: 10px; }
.card { border: 1px solid #ddd; padding: 6px; font-size: 0.8em; overflow-wrap: anywhere; }
.card img { width: 160px; height: 160px; display: block; margin-bottom: 4px; }
.right { color: #1f7a1f; } .wrong { color: #b22; }
.muted { color: #666; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: float) -> str:
    return f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]], text_cols: tuple[int, ...] = ()) -> str:
    """Cells arrive escaped (some carry markup); header cells are escaped here."""
    head = "".join(
        f'<th class="text">{_e(h)}</th>' if j in text_cols else f"<th>{_e(h)}</th>" for j, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(f'<td class="text">{v}</td>' if j in text_cols else f"<td>{v}</td>" for j, v in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _models(result: CompareResult) -> str:
    a, b = result.model_a, result.model_b
    rows = [
        ["model", _e(a.given), _e(b.given), ""],
        ["artifact", _e(a.uri), _e(b.uri), ""],
        ["version", _e(a.version), _e(b.version), ""],
        ["temperature", _e(f"{a.temperature:.3g}"), _e(f"{b.temperature:.3g}"), ""],
        ["accuracy", _num(a.accuracy), _num(b.accuracy), _e(f"{result.gain:+.4f}")],
        [
            "correct",
            _e(f"{a.correct} / {result.n}"),
            _e(f"{b.correct} / {result.n}"),
            _e(f"{b.correct - a.correct:+d}"),
        ],
        ["ECE (15 bins)", _num(a.ece), _num(b.ece), _e(f"{b.ece - a.ece:+.4f}")],
        ["classes", _e(", ".join(a.classes)), _e(", ".join(b.classes)), ""],
    ]
    return _table(["", "A (champion)", "B (challenger)", "B \u2212 A"], rows, text_cols=(1, 2))


def _per_class(result: CompareResult) -> str:
    rows = []
    for name in result.classes:
        sa, sb = result.model_a.per_class[name], result.model_b.per_class[name]
        rows.append(
            [
                _e(name),
                _e(sa["support"]),
                _num(float(sa["precision"])),
                _num(float(sb["precision"])),
                _num(float(sa["recall"])),
                _num(float(sb["recall"])),
                _e(f"{float(sb['recall']) - float(sa['recall']):+.4f}"),
            ]
        )
    return _table(["class", "support", "A precision", "B precision", "A recall", "B recall", "recall B \u2212 A"], rows)


def _mcnemar(result: CompareResult) -> str:
    mc = result.mcnemar
    table = _table(
        ["", "B right", "B wrong"],
        [
            ["A right", _e(mc.both_right), _e(f"{mc.b} (b)")],
            ["A wrong", _e(f"{mc.c} (c)"), _e(mc.both_wrong)],
        ],
    )
    return f"<p>{_e(mc.sentence())}</p>{table}"


def _verdict(d: Disagreement, model: str) -> str:
    pred, p = (d.pred_a, d.p_a) if model == "A" else (d.pred_b, d.p_b)
    cls = "right" if pred == d.label else "wrong"
    mark = "\u2713" if cls == "right" else "\u2717"
    return f'<div class="{cls}">{model}: {_e(pred)} ({p:.2f}) {mark}</div>'


def _card(d: Disagreement, thumb: str | None) -> str:
    name = d.uri.rsplit("/", 1)[-1]
    img = (
        f'<img src="{_e(quote(thumb))}" alt="{_e(name)}" loading="lazy">'
        if thumb
        else '<div class="muted">no thumbnail</div>'
    )
    return (
        f'<div class="card">{img}<div title="{_e(storage.redact(d.uri))}"><b>{_e(name)}</b></div>'
        f"<div>true: {_e(d.label)}</div>{_verdict(d, 'A')}{_verdict(d, 'B')}</div>"
    )


def _disagreements(result: CompareResult, thumbs: dict[str, str], per_kind: int) -> str:
    groups = _by_kind(result)
    parts = [
        (
            f"<p>A and B predict different classes on {len(result.disagreements)} of {result.n} images "
            "(the probability beside each prediction is that model's, after its calibration).</p>"
        )
    ]
    for kind, title in KINDS:
        items = groups[kind]
        shown = items[:per_kind]
        parts.append(f"<h3>{_e(title)} ({len(items)})</h3>")
        if not items:
            parts.append('<p class="muted">none</p>')
            continue
        if len(shown) < len(items):
            parts.append(
                f'<p class="muted">showing {len(shown)} of {len(items)}, the most confident first; '
                "summary.json lists them all</p>"
            )
        parts.append('<div class="grid">' + "".join(_card(d, thumbs.get(d.uri)) for d in shown) + "</div>")
    return "\n".join(parts)


def render_html(result: CompareResult, thumbs: dict[str, str], per_kind: int) -> str:
    """The self-contained page (inline CSS; thumbnails linked relatively); ``per_kind``
    cards of each kind of disagreement, as write_thumbnails wrote them."""
    title = "dragons compare: challenger B against champion A"
    verdict_cls = "beats" if result.beats else "not"
    facts = [f"{result.n} labelled images from {result.data} ({result.source})"]
    if result.unreadable:
        facts.append(f"{len(result.unreadable)} unreadable image(s) left out for both models")
    if result.unlabelled:
        facts.append(f"{result.unlabelled} unlabelled row(s) skipped")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="verdict {verdict_cls}">{_e(result.verdict())} (exit {result.exit_code})</p>',
        f"<p>{_e('; '.join(facts))}.</p>",
        *[f'<p class="muted">note: {_e(n)}</p>' for n in result.notes],
        "<h2>Models</h2>",
        _models(result),
        "<h2>Paired test</h2>",
        _mcnemar(result),
        "<h2>Per class</h2>",
        _per_class(result),
        "<h2>Disagreements</h2>",
        _disagreements(result, thumbs, per_kind),
    ]
    if result.unreadable:
        rows = [
            [_e(storage.redact(u)), _e(storage.shorten(err))] for u, err in result.unreadable[:MAX_UNREADABLE_SHOWN]
        ]
        more = len(result.unreadable) - MAX_UNREADABLE_SHOWN
        parts += ["<h2>Unreadable images</h2>", _table(["image", "error"], rows, text_cols=(0, 1))]
        if more > 0:
            parts.append(f'<p class="muted">and {more} more (summary.json lists them all)</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(result: CompareResult, out: str, max_thumbnails: int = 60) -> str:
    """summary.json, index.html and the thumbnails under ``out`` (local or s3://); returns index.html's URI.

    ``max_thumbnails``: disagreements shown as images, per kind (B right, A right, both
    wrong); summary.json lists them all."""
    result.out = storage.parse(out).uri
    result.report = storage.join(out, "index.html")
    thumbs = write_thumbnails(result, out, max_thumbnails)
    storage.write_bytes(
        storage.join(out, "summary.json"), (json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n").encode()
    )
    storage.write_bytes(result.report, render_html(result, thumbs, max_thumbnails).encode("utf-8"))
    return result.report
