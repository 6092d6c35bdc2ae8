"""``dragons report``: the morning after a night.

One scoring run of a Delta scores table, compared with the complete run before
it in the same table and, where the model artifact records it, with the
training set's class mix: counts, error kinds with examples, the predicted
class mix and its drift (Jensen-Shannon distance), confidence histograms,
the least and most sure images as thumbnails, and novelty (dragons.novelty): the
share of rows above the model's threshold against the previous run's, and the
most novel images. Written as ``index.html``,
``summary.json``, two PNG plots and ``thumbs/`` in one folder (all links
relative: open it from disk or copy it anywhere).

Memory and time do not grow with the table: everything is read through the
query layer (``dragons.score.query``) as SQL aggregates over one run and its
predecessor (GROUP BY label, a histogram of ``floor(score * bins)``) and
Top-N queries (ORDER BY ... LIMIT, ``arg_min/arg_max(..., n)`` per class), so
Python only ever holds a few hundred rows, and only those rows' images are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dragons import htmlkit, storage
from dragons.columns import NOVELTY
from dragons.decode import read_one, row_error
from dragons.errors import DragonsError, require_plotting
from dragons.htmlkit import Markup, tag
from dragons.images import DecodeOptions, decode
from dragons.rowerrors import ERROR_KIND, LEGACY_KIND_SQL
from dragons.score.engine import QueryLimits, guarded
from dragons.score.query import connect

SUMMARY_FILE = "summary.json"
INDEX_FILE = "index.html"
THUMBS_DIR = "thumbs"
MIX_PLOT = "class_mix.png"
CONFIDENCE_PLOT = "confidence.png"
# Error examples shown per kind: enough to find the files, never a list of thousands.
EXAMPLES_PER_KIND = 3
# Thumbnail reads at once: S3 latency, not CPU, is what a few dozen small reads wait on.
THUMB_THREADS = 8


@dataclass
class ReportOptions:
    top: int = 24  # least sure images listed in summary.json and shown (grouped by predicted class)
    surest: int = 4  # surest images shown per predicted class
    bins: int = 10  # confidence histogram bins over the top score, 0..1
    thumb_px: int = 128  # thumbnail size in pixels (longest side), JPEG
    novel: int = 12  # most novel images shown (what the model does not know)

    def validate(self) -> None:
        for name in ("top", "surest", "bins", "thumb_px", "novel"):
            if getattr(self, name) < (1 if name in ("bins", "thumb_px") else 0):
                raise DragonsError(
                    f"--{name.replace('_', '-')} {getattr(self, name)} is too small: give a positive number"
                )


# ----------------------------------------------------------------- SQL over one run


class RunReader:
    """One locked-down DuckDB connection over the table (views ``scores``, ``runs``),
    with every query under the ``--timeout`` and ``--memory-limit`` of ``dragons query``."""

    def __init__(self, table_uri: str, limits: QueryLimits | None = None) -> None:
        self.table_uri = table_uri
        self.limits = limits or QueryLimits()
        self.con = connect(table_uri, limits=self.limits)
        cols = self.con.execute("SELECT * FROM scores LIMIT 0").to_arrow_table().schema.names
        # Probability columns of every model the table has seen; a run's own are the non-NULL ones.
        self.prob_columns = [c for c in cols if c.startswith("p_")]
        # Tables written before dragons.novelty have no novelty column until their next append.
        self.has_novelty = NOVELTY in cols
        # Nor, written before error_kind, that column: their rows' kinds are read from the text.
        self.kind_sql = f"coalesce({ERROR_KIND}, {LEGACY_KIND_SQL})" if ERROR_KIND in cols else LEGACY_KIND_SQL

    def close(self) -> None:
        self.con.close()

    def rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        with guarded(self.con, self.limits):  # the same limits and messages as `dragons query`
            cur = self.con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def margin_sql(self) -> str:
        """The top-2 margin of a row (top score less the second-highest probability).

        Sorting the row's probabilities as a list reads only that row; a model with
        fewer classes than the table has leaves NULLs there, sorted last."""
        if not self.prob_columns:
            return "score"
        probs = ", ".join(f'"{c}"' for c in self.prob_columns)
        return f"(score - coalesce(list_sort([{probs}], 'DESC', 'NULLS LAST')[2], 0))"


# The rows of one run that have a prediction (error rows have no label or score).
RUN_ROWS = "run_id = ? AND error IS NULL AND label IS NOT NULL"


def list_runs(reader: RunReader) -> list[dict[str, Any]]:
    """Every run of the table (the ``runs`` view), in the order they last committed."""
    return reader.rows(
        "SELECT run_id, status, listed, kept, skipped, scored, errors, rows, model, model_version, input, "
        "dt, committed_at, first_version, last_version FROM runs ORDER BY last_version"
    )


def pick_runs(
    runs: list[dict[str, Any]], run_id: str | None, table_uri: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the run to report, the complete run before it or None).

    Default: the newest complete run. "Before" is commit order: the complete run
    (with rows scored) whose last commit is the newest one before this run's last commit."""
    shown = storage.redact(table_uri)
    if run_id:
        match = [r for r in runs if r["run_id"] == run_id]
        if not match:
            names = ", ".join(r["run_id"] for r in runs[-10:]) or "none"
            raise DragonsError(
                f"run {run_id!r} is not in the table {shown} (its newest runs: {names}): give one of "
                f"them with --run-id (`dragons query --table {shown}` lists them all)"
            )
        run = match[0]
    else:
        complete = [r for r in runs if r["status"] == "complete"]
        if not complete:
            raise DragonsError(
                f"the table {shown} has no complete run yet: wait for the night to finish, or give "
                "--run-id to report a running or partial one"
            )
        run = complete[-1]
    # A complete night that scored nothing (an --incremental night with nothing new) has
    # no mix to compare with: the previous run is the one before it that scored something.
    before = [
        r
        for r in runs
        if r["status"] == "complete"
        and r["last_version"] < run["last_version"]
        and r["run_id"] != run["run_id"]
        and (r["scored"] or 0) > 0
    ]
    return run, (before[-1] if before else None)


def class_counts(reader: RunReader, run_id: str) -> dict[str, int]:
    rows = reader.rows(
        f"SELECT label, count(*) AS n FROM scores WHERE {RUN_ROWS} GROUP BY label ORDER BY label", [run_id]
    )
    return {r["label"]: int(r["n"]) for r in rows}


def confidence_histogram(reader: RunReader, run_id: str, bins: int) -> list[int]:
    """Rows per bin of the top score over [0, 1] (a score of exactly 1 is in the last bin)."""
    rows = reader.rows(
        f"SELECT least(floor(score * {int(bins)}), {int(bins) - 1})::INTEGER AS b, count(*) AS n "
        f"FROM scores WHERE {RUN_ROWS} GROUP BY b",
        [run_id],
    )
    counts = [0] * bins
    for r in rows:
        counts[max(0, int(r["b"]))] += int(r["n"])
    return counts


def errors_by_kind(reader: RunReader, run_id: str) -> tuple[dict[str, int], dict[str, list[dict[str, str]]]]:
    """(kind -> rows, kind -> a few examples). ``min(uri, n)`` keeps n per kind, never the run's error list."""
    rows = reader.rows(
        f"SELECT {reader.kind_sql} AS kind, count(*) AS n, min(uri, {EXAMPLES_PER_KIND}) AS uris, "
        f"arg_min(error, uri, {EXAMPLES_PER_KIND}) AS msgs "
        "FROM scores WHERE run_id = ? AND error IS NOT NULL GROUP BY kind ORDER BY n DESC, kind",
        [run_id],
    )
    counts = {r["kind"]: int(r["n"]) for r in rows}
    examples = {r["kind"]: [{"uri": u, "error": m} for u, m in zip(r["uris"], r["msgs"])] for r in rows}
    return counts, examples


def _entry(r: dict[str, Any]) -> dict[str, Any]:
    out = {
        "uri": r["uri"],
        "label": r["label"],
        "score": float(r["score"]),
        "margin": float(r["margin"]),
        "model_version": r.get("model_version"),
    }
    if r.get(NOVELTY) is not None:
        out[NOVELTY] = float(r[NOVELTY])
    return out


def most_novel(reader: RunReader, run_id: str, n: int, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """The ``n`` rows of the run with the highest novelty, most novel first (a Top-N query);
    none when the table has no novelty column or the run's model no statistics (NULL novelty)."""
    if n <= 0 or not reader.has_novelty:
        return []
    extra = len(exclude or ())
    rows = reader.rows(
        f"SELECT uri, label, score, {reader.margin_sql()} AS margin, {NOVELTY}, model_version "
        f"FROM scores WHERE {RUN_ROWS} AND {NOVELTY} IS NOT NULL ORDER BY {NOVELTY} DESC, uri LIMIT ?",
        [run_id, n + extra],
    )
    return [_entry(r) for r in rows if r["uri"] not in (exclude or set())][:n]


def novelty_threshold(model_uri: str | None) -> float | None:
    """The run's model's ``threshold_p95`` (dragons.novelty): None for models without
    statistics, or an artifact that cannot be read now (the report goes on without it)."""
    if not model_uri:
        return None
    from dragons.artifact import read_meta

    try:
        nov = read_meta(model_uri).get("novelty") or {}
    except Exception:  # noqa: BLE001 (moved or unreadable: training_mix's note already says so)
        return None
    t = nov.get("threshold_p95")
    return float(t) if t is not None else None


def novel_share(reader: RunReader, run: dict[str, Any] | None) -> dict[str, Any] | None:
    """``{threshold_p95, above, rows, share}`` of one run: the share of its scored rows whose novelty
    is above its model's threshold; None without novelty (no column, no statistics, no rows)."""
    if run is None or not reader.has_novelty:
        return None
    threshold = novelty_threshold(run.get("model"))
    if threshold is None:
        return None
    r = reader.rows(
        f"SELECT count(*) FILTER (WHERE {NOVELTY} > ?) AS above, count({NOVELTY}) AS n FROM scores WHERE {RUN_ROWS}",
        [threshold, run["run_id"]],
    )[0]
    n = int(r["n"] or 0)
    if not n:
        return None
    return {"threshold_p95": threshold, "above": int(r["above"] or 0), "rows": n, "share": int(r["above"] or 0) / n}


def least_sure(reader: RunReader, run_id: str, n: int, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """The ``n`` least sure rows without error: lowest top score first, ties by the
    smaller top-2 margin (a Top-N query: DuckDB keeps n rows, not the run)."""
    if n <= 0:
        return []
    extra = len(exclude or ())  # rows already taken are skipped here, so ask for that many more
    rows = reader.rows(
        f"SELECT uri, label, score, {reader.margin_sql()} AS margin, model_version FROM scores "
        f"WHERE {RUN_ROWS} ORDER BY score, margin, uri LIMIT ?",
        [run_id, n + extra],
    )
    out = [_entry(r) for r in rows if r["uri"] not in (exclude or set())]
    return out[:n]


def per_class(reader: RunReader, run_id: str, k: int, surest: bool) -> dict[str, list[dict[str, Any]]]:
    """Per predicted class, its ``k`` surest (or least sure) rows. ``arg_max/arg_min(.., k)``
    keeps k rows per class while DuckDB scans the run once."""
    if k <= 0:
        return {}
    fn = "arg_max" if surest else "arg_min"  # ordered by score, ties by margin
    rows = reader.rows(
        f"SELECT label, {fn}({{uri: uri, label: label, score: score, margin: margin, model_version: model_version}}, "
        f"{{s: score, m: margin}}, ?) AS picked FROM (SELECT uri, label, score, {reader.margin_sql()} AS margin, model_version "
        f"FROM scores WHERE {RUN_ROWS}) GROUP BY label ORDER BY label",
        [k, run_id],
    )
    return {r["label"]: [_entry(p) for p in r["picked"]] for r in rows}


# ----------------------------------------------------------------- class mixes and drift


def shares(counts: Mapping[str, float] | None) -> dict[str, float] | None:
    """Counts as shares of their total (None when there is nothing to share)."""
    if not counts:
        return None
    total = float(sum(counts.values()))
    return {k: float(v) / total for k, v in sorted(counts.items())} if total > 0 else None


def js_distance(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen-Shannon distance, base 2 (0: the same mix, 1: no class in common) of two
    class mixes over the union of their classes.

    The same number as ``scipy.spatial.distance.jensenshannon(p, q, base=2)``,
    computed here so the core install needs no scipy."""
    classes = sorted(set(p) | set(q))
    a = np.array([p.get(c, 0.0) for c in classes], dtype=np.float64)
    b = np.array([q.get(c, 0.0) for c in classes], dtype=np.float64)
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(x: np.ndarray) -> float:
        nz = x > 0  # 0 * log 0 = 0 (scipy's rel_entr)
        return float(np.sum(x[nz] * np.log(x[nz] / m[nz])))

    divergence = (kl(a) + kl(b)) / 2 / math.log(2)
    return math.sqrt(max(0.0, divergence))


def compare(now: dict[str, float] | None, other: dict[str, float] | None) -> dict[str, Any] | None:
    """``{js_distance, per_class: class -> change in share}``, or None without both mixes."""
    if not now or not other:
        return None
    classes = sorted(set(now) | set(other))
    return {
        "js_distance": js_distance(now, other),
        "per_class": {c: now.get(c, 0.0) - other.get(c, 0.0) for c in classes},
    }


def training_mix(model_uri: str | None) -> tuple[dict[str, float] | None, str | None]:
    """(the training set's class mix from the artifact's ``data.train_class_counts``, or
    None and why). Older artifacts do not record it; a deleted artifact is no reason to fail."""
    if not model_uri:
        return None, "the run's commits name no model artifact"
    from dragons.artifact import read_meta

    try:
        meta = read_meta(model_uri)
    except Exception as exc:  # noqa: BLE001 (moved or unreadable: the report goes on without it)
        return (
            None,
            f"the model artifact {storage.redact(model_uri)} could not be read ({storage.shorten(str(exc), 200)})",
        )
    counts = (meta.get("data") or {}).get("train_class_counts")
    if not counts:
        return None, f"the model artifact {storage.redact(model_uri)} does not record its training class counts"
    return shares({str(k): float(v) for k, v in counts.items()}), None


# ----------------------------------------------------------------- thumbnails


def _thumb_name(uri: str) -> str:
    # A hash, not the object's name: keys may hold any bytes, and two prefixes the same file name.
    return hashlib.sha1(uri.encode("utf-8", "backslashreplace")).hexdigest()[:20] + ".jpg"


class _Thumbnailer:
    """Reads objects from wherever they live (S3 or local disk) and writes small JPEGs.

    An object that cannot be read or decoded is recorded with its reason: the
    page names it; the report never fails on one image."""

    def __init__(self, folder: Path, px: int) -> None:
        self.folder, self.px = folder, px

    def one(self, uri: str) -> str | None:
        """Write ``uri``'s thumbnail; None when written, else why not (as the table's error rows say it)."""
        data = read_one(uri)  # the listed key verbatim, as scoring read it
        if isinstance(data, str):
            return storage.redact(data)
        try:
            img = decode(data, DecodeOptions(min_side=self.px))
            img.thumbnail((self.px, self.px))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
            (self.folder / _thumb_name(uri)).write_bytes(buf.getvalue())
            return None
        except Exception as exc:  # noqa: BLE001 (a codec bug or a bad file: name it on the page)
            return storage.redact(row_error(exc))

    def all(self, uris: list[str]) -> dict[str, str]:
        """Thumbnails for ``uris``; returns uri -> reason for those that failed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(THUMB_THREADS) as pool:
            reasons = dict(zip(uris, pool.map(self.one, uris)))
        return {u: r for u, r in reasons.items() if r}


# ----------------------------------------------------------------- plots


def _plot_mixes(mixes: dict[str, dict[str, float] | None], path: Path) -> None:
    """Grouped bars: each class's share now, in the previous run, in training."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    shown = {name: m for name, m in mixes.items() if m}
    classes = sorted({c for m in shown.values() for c in m})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) + 2), 3.6))
    try:
        width = 0.8 / max(1, len(shown))
        x = np.arange(len(classes))
        for i, (name, mix) in enumerate(shown.items()):
            ax.bar(x + (i - (len(shown) - 1) / 2) * width, [mix.get(c, 0.0) for c in classes], width, label=name)
        ax.set_xticks(
            x,
            [c.replace("$", r"\$") for c in classes],
            rotation=30 if len(classes) > 6 else 0,
            ha="right" if len(classes) > 6 else "center",
        )
        ax.set_ylabel("share of predicted labels")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Predicted class mix")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _plot_confidence(edges: list[float], now: list[int], before: list[int] | None, path: Path) -> None:
    """The top score's distribution now and in the previous run, as shares (runs differ in size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    try:
        for name, counts in (("this run", now), ("previous run", before)):
            if counts and sum(counts):
                ax.stairs(
                    np.array(counts, dtype=float) / sum(counts),
                    edges,
                    label=name,
                    fill=name == "this run",
                    alpha=0.5 if name == "this run" else 1.0,
                    linewidth=2,
                )
        ax.set_xlabel("top score")
        ax.set_ylabel("share of rows")
        ax.set_xlim(0, 1)
        ax.legend(loc="upper left")
        ax.set_title("Confidence")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------- the page

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.num{text-align:right}code{font-size:90%}
.grid{display:flex;flex-wrap:wrap;gap:8px;margin:6px 0 14px}
figure{margin:0;width:140px;font-size:11px;overflow-wrap:anywhere}
figure img{max-width:128px;max-height:128px;display:block}
figure.plot{width:auto;display:inline-block;margin-right:12px}figure.plot img{max-width:100%;max-height:none}
figure.missing{border:2px dashed #c33;padding:4px;width:128px;min-height:60px;color:#c33}
figure.broken img{display:none}.why{color:#c33;font-weight:bold}
.drift{font-size:120%}.bad{color:#c33}.ok{color:#282}
"""

# Every <img> says whether it loaded (data-state ok/broken), so a browser test can
# check them all, and a broken one gets a visible caption instead of an empty box.
_SCRIPT = """
function loaded(img){img.dataset.state='ok';}
function broken(img){img.dataset.state='broken';var f=img.closest('figure');
 if(f){f.classList.add('broken');var w=f.querySelector('.why');
 if(w){w.textContent='thumbnail did not load: '+img.getAttribute('src');}}}
"""


def _img(src: str, alt: str) -> Markup:
    return htmlkit.img(src, alt, data_state="loading", onload="loaded(this)", onerror="broken(this)")


def _pct(x: float | None) -> str:
    return "\u2013" if x is None else f"{100 * x:.1f}%"


def _num(value: Any) -> Markup:
    return tag("span", "\u2013" if value is None else value, class_="num")


def _thumb(entry: dict[str, Any], failed: dict[str, str]) -> Markup:
    name = entry["uri"].rsplit("/", 1)[-1]
    lines = [name, f"{entry['label']} {entry['score']:.3f} (margin {entry['margin']:.3f})"]
    if entry.get(NOVELTY) is not None:
        lines.append(f"novelty {entry[NOVELTY]:.2f}")
    caption = tag("figcaption", htmlkit.join(lines, sep="<br>"))
    if entry["uri"] in failed:  # unreadable now: named, never a broken <img>
        why = tag("span", f"unreadable: {failed[entry['uri']]}", class_="why")
        return tag("figure", htmlkit.join([why, caption]), class_="missing", title=entry["uri"])
    src = f"{THUMBS_DIR}/{_thumb_name(entry['uri'])}"
    return tag("figure", htmlkit.join([_img(src, name), tag("span", "", class_="why"), caption]), title=entry["uri"])


def _grids(groups: dict[str, list[dict[str, Any]]], failed: dict[str, str]) -> Markup:
    if not groups:
        return tag("p", "none")
    return htmlkit.join(
        htmlkit.join(
            [
                tag("h3", f"{label} ({len(items)})"),
                tag("div", htmlkit.join(_thumb(e, failed) for e in items), class_="grid"),
            ]
        )
        for label, items in groups.items()
    )


def _plot(src: str, alt: str) -> Markup:
    return tag("figure", htmlkit.join([_img(src, alt), tag("span", "", class_="why")]), class_="plot")


def _drift_line(s: dict[str, Any]) -> Markup:
    js = s["drift"]["js_distance"]
    if js is None:
        return tag("p", "No previous complete run in this table to compare with.", class_="drift")
    return tag(
        "p",
        htmlkit.join(
            [
                "Class-mix drift from ",
                tag("b", s["previous_run_id"]),
                ": Jensen-Shannon distance ",
                tag("b", f"{js:.3f}"),
                " (0 = the same mix, 1 = no class in common)",
            ]
        ),
        class_="drift",
    )


def _novelty_section(nov: dict[str, Any], previous: str | None, failed: dict[str, str]) -> list[Markup]:
    """What the model does not know: the share of rows above the training threshold, and the most novel images."""
    head = tag("h2", "Novelty: what the model does not know")
    if nov["share"] is None:
        return [
            head,
            tag(
                "p",
                "No novelty scores for this run: its model was trained without novelty statistics "
                "(retrain it with this dragons), or the table predates the novelty column.",
            ),
        ]
    before = (
        "no previous run with novelty to compare with"
        if nov["previous_share"] is None
        else f"previous run {previous}: {_pct(nov['previous_share'])}"
    )
    line = tag(
        "p",
        htmlkit.join(
            [
                f"Rows above the model's novelty threshold ({nov['threshold_p95']:.2f}, the 95th percentile of its "
                "held-out training-time images, so about 5% when nothing changed): ",
                tag("b", _pct(nov["share"])),
                f" ({nov['above']} of {nov['rows']}); {before}.",
            ]
        ),
        class_="novelty",
    )
    grid = _grids({"the most novel images": nov["most_novel"]}, failed) if nov["most_novel"] else tag("p", "none")
    return [head, line, grid]


def render_html(s: dict[str, Any], failed: dict[str, str]) -> str:
    """The page for summary ``s``; ``failed``: uri -> why its thumbnail could not be made."""
    c = s["counts"]
    mixes = [("this run", s["class_mix"]), ("previous", s["previous_class_mix"]), ("training", s["training_class_mix"])]
    classes = sorted({k for _, m in mixes if m for k in m})
    change = s["drift"]["per_class"]
    mix_rows = [
        [k, *[_pct((m or {}).get(k) if m else None) for _, m in mixes], _pct(change.get(k)) if change else "\u2013"]
        for k in classes
    ]
    err_rows = [
        [k, _num(n), htmlkit.join((tag("code", x["uri"]) for x in s["error_examples"].get(k, [])), sep="<br>")]
        for k, n in s["errors_by_kind"].items()
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in s["uncertain"]:
        groups.setdefault(e["label"], []).append(e)
    title = f"dragons run {s['run_id']}"
    about = [
        "Table ",
        tag("code", s["table"]),
        f"; status {s['status']}; model version ",
        tag("code", s["model_version"]),
        "; input ",
        tag("code", s["input"]),
        f"; previous run: {s['previous_run_id'] or 'none'}. Generated {s['generated_at']}.",
    ]
    counted = ("listed", "skipped", "scored", "errors")
    parts: list[Markup] = [
        tag("p", htmlkit.join(about)),
        htmlkit.table(counted, [[_num(c[k]) for k in counted]]),
        tag("h2", "Class mix"),
        _drift_line(s),
        _plot(MIX_PLOT, "class mix"),
        htmlkit.table(["class", "this run", "previous", "training", "change vs previous"], mix_rows),
        tag("h2", "Confidence"),
        _plot(CONFIDENCE_PLOT, "confidence histogram"),
        tag("h2", "Errors"),
        htmlkit.table(["kind", "rows", "examples"], err_rows) if err_rows else tag("p", "No error rows."),
        tag("h2", f"The {len(s['uncertain'])} least sure images, by predicted class"),
        _grids(groups, failed),
        tag("h2", "The surest images per predicted class"),
        _grids(s["surest"], failed),
        *_novelty_section(s["novelty"], s["previous_run_id"], failed),
    ]
    if failed:
        items = htmlkit.join(tag("li", htmlkit.join([tag("code", u), f": {r}"])) for u, r in failed.items())
        parts += [tag("h2", "Images that could not be shown"), tag("ul", items)]
    if s["notes"]:
        parts += [tag("h2", "Notes"), tag("ul", htmlkit.join(tag("li", n) for n in s["notes"]))]
    return htmlkit.page(title, parts, css=_CSS, script=_SCRIPT)


# ----------------------------------------------------------------- the report


def _summary(
    reader: RunReader, run: dict[str, Any], prev: dict[str, Any] | None, opts: ReportOptions
) -> dict[str, Any]:
    """Everything the page shows, from aggregates and Top-N queries (no image read yet)."""
    rid = run["run_id"]
    now_counts = class_counts(reader, rid)
    prev_counts = class_counts(reader, prev["run_id"]) if prev else None
    kinds, examples = errors_by_kind(reader, rid)
    train_mix, train_note = training_mix(run.get("model"))
    mix, prev_mix = shares(now_counts), shares(prev_counts)
    vs_prev, vs_train = compare(mix, prev_mix), compare(mix, train_mix)
    notes = [n for n in (train_note,) if n]
    if run["status"] != "complete":
        notes.append(f"run {rid} is {run['status']}, not complete: its counts are what it has committed so far")
    return {
        "run_id": rid,
        "previous_run_id": prev["run_id"] if prev else None,
        "status": run["status"],
        "table": storage.redact(reader.table_uri),
        "model": run.get("model"),
        "model_version": run.get("model_version"),
        "input": run.get("input"),
        "dt": run.get("dt"),
        "committed_at": run.get("committed_at"),
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {k: run.get(k) for k in ("listed", "skipped", "scored", "errors")},
        "errors_by_kind": kinds,
        "error_examples": examples,
        "class_counts": now_counts,
        "class_mix": mix,
        "previous_class_mix": prev_mix,
        "training_class_mix": train_mix,
        "drift": {
            "js_distance": vs_prev["js_distance"] if vs_prev else None,
            "per_class": vs_prev["per_class"] if vs_prev else {},
            "vs_training": vs_train,
        },
        "confidence": {
            "bins": opts.bins,
            "edges": [i / opts.bins for i in range(opts.bins + 1)],
            "now": confidence_histogram(reader, rid, opts.bins),
            "previous": confidence_histogram(reader, prev["run_id"], opts.bins) if prev else None,
        },
        "uncertain": [
            {k: e[k] for k in ("uri", "label", "score", "margin")} for e in least_sure(reader, rid, opts.top)
        ],
        "surest": {
            label: [{k: e[k] for k in ("uri", "label", "score", "margin")} for e in items]
            for label, items in per_class(reader, rid, opts.surest, surest=True).items()
        },
        "novelty": _novelty_summary(reader, run, prev, opts.novel),
        "notes": notes,
    }


def _novelty_summary(reader: RunReader, run: dict[str, Any], prev: dict[str, Any] | None, n: int) -> dict[str, Any]:
    """The run's share of novel rows (above its model's threshold) against the previous run's, and
    its most novel images. ``share`` is None when the run has no novelty (older model or table)."""
    now, before = novel_share(reader, run), novel_share(reader, prev)
    return {
        "threshold_p95": now["threshold_p95"] if now else None,
        "above": now["above"] if now else None,
        "rows": now["rows"] if now else None,
        "share": now["share"] if now else None,
        "previous_share": before["share"] if before else None,
        "most_novel": [
            {k: e[k] for k in ("uri", "label", "score", "margin", NOVELTY)}
            for e in most_novel(reader, run["run_id"], n)
        ],
    }


def _write_text(path: Path, text: str) -> None:
    """Written under a temporary name and renamed: a reader never sees half a page."""
    tmp = path.with_name(f".{path.name}.part-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _render(folder: Path, s: dict[str, Any], opts: ReportOptions) -> dict[str, str]:
    """Plots, thumbnails, summary.json and index.html (last) into ``folder``; returns failed thumbnails."""
    folder.mkdir(parents=True, exist_ok=True)
    _plot_mixes(
        {"this run": s["class_mix"], "previous run": s["previous_class_mix"], "training": s["training_class_mix"]},
        folder / MIX_PLOT,
    )
    conf = s["confidence"]
    _plot_confidence(conf["edges"], conf["now"], conf["previous"], folder / CONFIDENCE_PLOT)
    uris = list(
        dict.fromkeys(
            [e["uri"] for e in s["uncertain"]]
            + [e["uri"] for items in s["surest"].values() for e in items]
            + [e["uri"] for e in s["novelty"]["most_novel"]]
        )
    )
    failed = _Thumbnailer(folder / THUMBS_DIR, opts.thumb_px).all(uris)
    s["thumbnails"] = {
        "written": len(uris) - len(failed),
        "failed": [{"uri": u, "reason": r} for u, r in failed.items()],
    }
    _write_text(folder / SUMMARY_FILE, json.dumps(storage.redact_obj(s), indent=2) + "\n")
    _write_text(folder / INDEX_FILE, render_html(s, failed))
    return failed


@contextlib.contextmanager
def _local_folder(out_dir: str) -> Iterator[Path]:
    """The folder to build the report in: ``out_dir`` itself, or a temp folder uploaded to S3 after."""
    loc = storage.parse(out_dir)
    if not loc.is_s3:
        yield Path(loc.path)
        return
    with tempfile.TemporaryDirectory(prefix="dragons-report-") as tmp:
        yield Path(tmp)
        storage.upload_dir(tmp, loc.uri)


def write_run_report(
    table_uri: str,
    out_dir: str,
    run_id: str | None = None,
    top: int = ReportOptions.top,
    surest: int = ReportOptions.surest,
    bins: int = ReportOptions.bins,
    thumb_px: int = ReportOptions.thumb_px,
    limits: QueryLimits | None = None,
    novel: int = ReportOptions.novel,
) -> dict[str, Any]:
    """Write ``out_dir``/index.html, summary.json, plots and thumbs/ for one run of the
    table (default: its newest complete run); returns the summary.

    ``out_dir`` is a local folder or ``s3://`` (built locally, then uploaded)."""
    opts = ReportOptions(top=top, surest=surest, bins=bins, thumb_px=thumb_px, novel=novel)
    opts.validate()
    require_plotting("dragons report")  # before any query: the report extra is optional
    storage.parse(out_dir)  # a malformed --out fails before the table is read
    reader = RunReader(table_uri, limits)
    try:
        run, prev = pick_runs(list_runs(reader), run_id, table_uri)
        s = _summary(reader, run, prev, opts)
    finally:
        reader.close()
    try:
        with _local_folder(out_dir) as folder:  # an S3 report is uploaded when complete
            _render(folder, s, opts)
    except OSError as exc:
        raise DragonsError(
            f"--out {out_dir}: cannot write the report there ({exc.strerror or exc}): check the "
            "folder's permissions and free space"
        ) from None
    s["report"] = storage.join(out_dir, INDEX_FILE)
    return s
