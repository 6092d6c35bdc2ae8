"""``dragons compare``'s page: the two models side by side, per class, the McNemar test
in words, and thumbnails of the images where they disagree.

Thumbnails are small JPEGs written beside the page (``thumbs/``), linked
relatively as dragons.report's PNGs are, so the folder can be copied or synced
as a unit. Every text cell is escaped (dragons.htmlkit): class names and URIs
come from users' folders and tables.
"""

from __future__ import annotations

import io
import json

from PIL import Image

from dragons import htmlkit, storage
from dragons.errors import DragonsError
from dragons.htmlkit import Markup, tag
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


def _num(value: float) -> str:
    return f"{value:.4f}"


def _models(result: CompareResult) -> Markup:
    a, b = result.model_a, result.model_b
    rows = [
        ["model", a.given, b.given, ""],
        ["artifact", a.uri, b.uri, ""],
        ["version", a.version, b.version, ""],
        ["temperature", f"{a.temperature:.3g}", f"{b.temperature:.3g}", ""],
        ["accuracy", _num(a.accuracy), _num(b.accuracy), f"{result.gain:+.4f}"],
        ["correct", f"{a.correct} / {result.n}", f"{b.correct} / {result.n}", f"{b.correct - a.correct:+d}"],
        ["ECE (15 bins)", _num(a.ece), _num(b.ece), f"{b.ece - a.ece:+.4f}"],
        ["classes", ", ".join(a.classes), ", ".join(b.classes), ""],
    ]
    return htmlkit.table(["", "A (champion)", "B (challenger)", "B \u2212 A"], rows, text_cols=(1, 2))


def _per_class(result: CompareResult) -> Markup:
    rows = []
    for name in result.classes:
        sa, sb = result.model_a.per_class[name], result.model_b.per_class[name]
        rows.append(
            [
                name,
                sa["support"],
                _num(float(sa["precision"])),
                _num(float(sb["precision"])),
                _num(float(sa["recall"])),
                _num(float(sb["recall"])),
                f"{float(sb['recall']) - float(sa['recall']):+.4f}",
            ]
        )
    header = ["class", "support", "A precision", "B precision", "A recall", "B recall", "recall B \u2212 A"]
    return htmlkit.table(header, rows)


def _mcnemar(result: CompareResult) -> Markup:
    mc = result.mcnemar
    table = htmlkit.table(
        ["", "B right", "B wrong"],
        [["A right", mc.both_right, f"{mc.b} (b)"], ["A wrong", f"{mc.c} (c)", mc.both_wrong]],
    )
    return htmlkit.join([tag("p", mc.sentence()), table])


def _verdict(d: Disagreement, model: str) -> Markup:
    pred, p = (d.pred_a, d.p_a) if model == "A" else (d.pred_b, d.p_b)
    cls = "right" if pred == d.label else "wrong"
    mark = "\u2713" if cls == "right" else "\u2717"
    return tag("div", f"{model}: {pred} ({p:.2f}) {mark}", class_=cls)


def _card(d: Disagreement, thumb: str | None) -> Markup:
    name = d.uri.rsplit("/", 1)[-1]
    picture = htmlkit.img(thumb, name, loading="lazy") if thumb else tag("div", "no thumbnail", class_="muted")
    named = tag("div", tag("b", name), title=storage.redact(d.uri))
    truth = tag("div", f"true: {d.label}")
    return tag("div", htmlkit.join([picture, named, truth, _verdict(d, "A"), _verdict(d, "B")]), class_="card")


def _disagreements(result: CompareResult, thumbs: dict[str, str], per_kind: int) -> list[Markup]:
    groups = _by_kind(result)
    parts = [
        tag(
            "p",
            f"A and B predict different classes on {len(result.disagreements)} of {result.n} images "
            "(the probability beside each prediction is that model's, after its calibration).",
        )
    ]
    for kind, title in KINDS:
        items = groups[kind]
        shown = items[:per_kind]
        parts.append(tag("h3", f"{title} ({len(items)})"))
        if not items:
            parts.append(tag("p", "none", class_="muted"))
            continue
        if len(shown) < len(items):
            parts.append(
                tag(
                    "p",
                    f"showing {len(shown)} of {len(items)}, the most confident first; summary.json lists them all",
                    class_="muted",
                )
            )
        parts.append(tag("div", htmlkit.join(_card(d, thumbs.get(d.uri)) for d in shown), class_="grid"))
    return parts


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
    parts: list[Markup] = [
        tag("p", f"{result.verdict()} (exit {result.exit_code})", class_=f"verdict {verdict_cls}"),
        tag("p", "; ".join(facts) + "."),
        *[tag("p", f"note: {n}", class_="muted") for n in result.notes],
        tag("h2", "Models"),
        _models(result),
        tag("h2", "Paired test"),
        _mcnemar(result),
        tag("h2", "Per class"),
        _per_class(result),
        tag("h2", "Disagreements"),
        *_disagreements(result, thumbs, per_kind),
    ]
    if result.unreadable:
        rows = [[storage.redact(u), storage.shorten(err)] for u, err in result.unreadable[:MAX_UNREADABLE_SHOWN]]
        more = len(result.unreadable) - MAX_UNREADABLE_SHOWN
        parts += [tag("h2", "Unreadable images"), htmlkit.table(["image", "error"], rows, text_cols=(0, 1))]
        if more > 0:
            parts.append(tag("p", f"and {more} more (summary.json lists them all)", class_="muted"))
    return htmlkit.page(title, parts, css=_CSS)


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
