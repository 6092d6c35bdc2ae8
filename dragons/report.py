"""Static evaluation report: metrics JSON, diagnostic PNGs and an index.html.

The report mirrors the plots of the fastai "dragons" notebook (learning-rate
finder, training curves, confusion matrix, most/least confident images, top
losses) plus a reliability diagram, and bundles them in a self-contained
directory that can be opened from disk or copied anywhere as a unit (all
links are relative).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import matplotlib
import pyarrow as pa
import pyarrow.csv as pcsv

from dragons import htmlkit, storage
from dragons.calibration import describe as describe_calibration
from dragons.columns import prediction_columns
from dragons.errors import DragonsError
from dragons.images import ImageError, decode_to_base
from dragons.storage import redact_obj

# Workers and CI have no display; select the file-only backend before pyplot
# is imported so it never tries to open a GUI.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dragons.metrics import (  # noqa: E402
    LOG_CLIP,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    select_grids,
)

DPI = 100
# Inches per image cell in the grids; with DPI=100 that is ~220 px per image.
CELL_IN = 2.2
# Per-class grids get one row per class; beyond this they would become huge
# images, so only the first classes are drawn (the HTML says so).
MAX_CLASS_ROWS = 12
# Phase colours for the training curves; unknown phases fall back to grey.
PHASE_COLORS = {"head": "tab:purple", "frozen": "tab:blue", "unfrozen": "tab:orange"}

ImageLoader = Callable[[int], np.ndarray]


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def _mpl_text(text: str) -> str:
    """Escape ``$`` so a file or class name is never parsed as mathtext."""
    return text.replace("$", r"\$")


def _short_name(name: str, max_len: int = 24) -> str:
    """Last path component of a local path or URL, truncated for a title."""
    base = PurePosixPath(str(name).replace("\\", "/")).name or str(name)
    return base if len(base) <= max_len else base[: max_len - 1] + "\u2026"


@contextmanager
def _saved(fig: Figure, path: str | Path) -> Iterator[Figure]:
    """Draw into ``fig`` inside the block, then lay out and save it.

    The figure is closed whether or not drawing succeeded: pyplot keeps every
    open figure alive, so a long-running worker would otherwise leak memory.
    """
    try:
        yield fig
        # tight_layout ignores the suptitle: keep ~0.4 in above the axes for it,
        # or multi-line image titles run into it.
        top = 1 - 0.4 / fig.get_figheight() if fig.get_suptitle() else 1
        fig.tight_layout(rect=(0, 0, 1, top))
        fig.savefig(Path(path), dpi=DPI)
    finally:
        plt.close(fig)


def _placeholder(ax: Axes, message: str) -> None:
    """Blank axes with a centred message, used when there is nothing to draw."""
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, color="0.4", transform=ax.transAxes)


def _show_image(ax: Axes, image: np.ndarray, title: str) -> None:
    """Draw one image cell; 2-D arrays are shown as greyscale."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        ax.imshow(arr, cmap="gray")
    else:
        ax.imshow(arr)
    ax.set_title(_mpl_text(title), fontsize=7)
    ax.axis("off")


# --------------------------------------------------------------------------
# individual plots
# --------------------------------------------------------------------------


def plot_lr_find(lrs: list[float], losses: list[float], suggestion: float | None, path: str | Path) -> None:
    """Loss versus learning rate on a log axis, with the suggested LR marked."""
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses differ in length ({len(lrs)} vs {len(losses)})")
    fig, ax = plt.subplots(figsize=(6, 4))
    with _saved(fig, path):
        if not lrs:
            _placeholder(ax, "no learning-rate finder data")
        else:
            x = np.asarray(lrs, dtype=np.float64)
            y = np.asarray(losses, dtype=np.float64)
            ax.plot(x, y, color="tab:blue")
            ax.set_xscale("log")
            ax.set_xlabel("learning rate")
            ax.set_ylabel("loss")
            if suggestion is not None and suggestion > 0:
                _mark_suggestion(ax, x, y, float(suggestion))
        ax.set_title("Learning-rate finder")


def _mark_suggestion(ax: Axes, lrs: np.ndarray, losses: np.ndarray, suggestion: float) -> None:
    """Vertical line at the suggested LR plus a dot on the curve and a label.

    The loss at the suggestion is interpolated in log-LR space because the
    finder samples LRs geometrically and the suggestion rarely hits a sample.
    """
    ax.axvline(suggestion, color="tab:red", linestyle="--", linewidth=1)
    order = np.argsort(lrs)
    finite = np.isfinite(losses[order]) & (lrs[order] > 0)
    if not finite.any():
        return
    log_x = np.log10(lrs[order][finite])
    y_at = float(np.interp(np.log10(suggestion), log_x, losses[order][finite]))
    ax.plot([suggestion], [y_at], "o", color="tab:red")
    ax.annotate(
        f"suggested lr = {suggestion:.2e}",
        xy=(suggestion, y_at),
        xytext=(10, 15),
        textcoords="offset points",
        color="tab:red",
        fontsize=9,
        arrowprops={"arrowstyle": "->", "color": "tab:red"},
    )


def _epoch_axis(history: Sequence[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """x positions for the history rows.

    Trainers often restart the epoch counter per phase (frozen 0, unfrozen
    0, 1, ...). Plotting raw epochs would then stack phases on top of each
    other, so fall back to a cumulative count unless the epochs already
    increase strictly across the whole run.
    """
    epochs = [row.get("epoch") for row in history]
    if all(isinstance(e, (int, float)) for e in epochs):
        arr = np.asarray(epochs, dtype=np.float64)
        if arr.size < 2 or np.all(np.diff(arr) > 0):
            return arr, "epoch"
    return np.arange(1, len(history) + 1, dtype=np.float64), "epoch (cumulative)"


def _phase_spans(history: Sequence[dict[str, Any]], x: np.ndarray) -> list[tuple[str, float, float]]:
    """Contiguous runs of the same phase as (phase, x_start, x_end)."""
    spans: list[tuple[str, float, float]] = []
    for row, xi in zip(history, x):
        phase = str(row.get("phase", "?"))
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], float(xi))
        else:
            spans.append((phase, float(xi), float(xi)))
    return spans


def _column(history: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    # Missing / None values become NaN so matplotlib leaves a gap instead of failing.
    return np.asarray([np.nan if row.get(key) is None else float(row[key]) for row in history])


def _shade_phases(ax: Axes, spans: list[tuple[str, float, float]]) -> None:
    """Tint each phase's x-range so phases are distinguishable on both panels."""
    for phase, start, end in spans:
        color = PHASE_COLORS.get(phase, "0.6")
        ax.axvspan(start - 0.5, end + 0.5, color=color, alpha=0.12, linewidth=0)
        ax.text(
            (start + end) / 2,
            1.0,
            _mpl_text(phase),
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=8,
            color=color,
        )


def _expand_head_curve(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray | None]:
    """Rows to plot, and their x positions when a head phase carries its per-pass curve.

    The precomputed head trains for many cheap passes in one checkpointed epoch;
    its ``head_curve`` is spread evenly over (epoch - 1, epoch] so it ends where
    the head's row would sit and the fine-tuning epochs follow at 1, 2, ...
    """
    if not any(row.get("head_curve") for row in history):
        return history, None
    rows: list[dict[str, Any]] = []
    xs: list[float] = []
    for i, row in enumerate(history):
        epoch = float(row.get("epoch", i))
        curve = row.get("head_curve") or []
        if curve:
            for j, point in enumerate(curve):
                rows.append({**point, "phase": row.get("phase", "head")})
                xs.append(epoch - 1 + (j + 1) / len(curve))
        else:
            rows.append(row)
            xs.append(epoch)
    return rows, np.asarray(xs, dtype=np.float64)


def plot_training_curves(history: list[dict[str, Any]], path: str | Path) -> None:
    """Loss (train/valid) and accuracy per epoch, with training phases shaded."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    with _saved(fig, path):
        if not history:
            _placeholder(ax_loss, "no training history")
            _placeholder(ax_acc, "no training history")
        else:
            history, xs = _expand_head_curve(history)
            if xs is not None and all(row.get("phase") == "head" for row in history):
                x, xlabel = (
                    np.arange(1, len(history) + 1, dtype=np.float64),
                    "pass over the cached features (head only)",
                )
            elif xs is not None:
                x, xlabel = xs, "epoch (head: passes over cached features)"
            else:
                x, xlabel = _epoch_axis(history)
            spans = _phase_spans(history, x)
            ax_loss.plot(x, _column(history, "train_loss"), "o-", label="train loss", color="tab:blue")
            ax_loss.plot(x, _column(history, "valid_loss"), "s--", label="valid loss", color="tab:orange")
            ax_acc.plot(x, _column(history, "accuracy"), "o-", label="accuracy", color="tab:green")
            for ax, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy")):
                _shade_phases(ax, spans)
                # Epochs are whole numbers; avoid ticks like 1.5.
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.set_xlabel(xlabel)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8, loc="best")
        fig.suptitle("Training curves (shaded by phase)")


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, classes: list[str], path: str | Path) -> None:
    """Confusion matrix heat map (rows = actual, cols = predicted) with counts."""
    mat = np.asarray(cm, dtype=np.int64)
    n = len(classes)
    if mat.shape != (n, n):
        raise ValueError(f"confusion matrix shape {mat.shape} does not match {n} classes")
    # Grow with the class count but stay bounded so the PNG stays modest.
    side = float(np.clip(1.5 + 0.6 * n, 4.0, 12.0))
    fig, ax = plt.subplots(figsize=(side, side))
    with _saved(fig, path):
        ax.imshow(mat, cmap="Blues", vmin=0)
        labels = [_mpl_text(c) for c in classes]
        ax.set_xticks(range(n), labels, rotation=45, ha="right")
        ax.set_yticks(range(n), labels)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("Actual")
        ax.set_title("Confusion matrix")
        if n <= 30:  # beyond this the numbers are unreadable anyway
            _annotate_counts(ax, mat)


def _annotate_counts(ax: Axes, mat: np.ndarray) -> None:
    # Switch to white text on dark cells so counts stay legible.
    threshold = mat.max() / 2 if mat.size and mat.max() > 0 else 0
    for (i, j), value in np.ndenumerate(mat):
        color = "white" if value > threshold else "black"
        ax.text(j, i, str(int(value)), ha="center", va="center", color=color, fontsize=10)


def plot_reliability(
    probs: np.ndarray, labels: np.ndarray, path: str | Path, n_bins: int = 15, title: str = "Reliability diagram"
) -> None:
    """Reliability diagram (accuracy vs confidence per bin) with ECE in the title.

    The lower panel shows how many samples fall in each bin, because a large
    gap in a nearly empty bin matters much less than a small one in a full bin.
    """
    bins = reliability_bins(probs, labels, n_bins)
    count = np.asarray(bins["count"])
    n = int(count.sum())
    ece = expected_calibration_error(probs, labels, n_bins) if n else 0.0
    edges = np.asarray(bins["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = count > 0

    fig, (ax, ax_hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    with _saved(fig, path):
        acc = np.asarray(bins["accuracy"])
        conf = np.asarray(bins["confidence"])
        ax.bar(centers[filled], acc[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
        # Hatched red boxes span accuracy..confidence: the miscalibration gap.
        # Hatching (not fill) keeps under-confident bins, where the box lies
        # inside the blue bar, readable.
        lo = np.minimum(acc, conf)[filled]
        ax.bar(
            centers[filled],
            np.abs(conf - acc)[filled],
            bottom=lo,
            width=width,
            facecolor="none",
            edgecolor="tab:red",
            hatch="//",
            linewidth=1,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title(f"{title} (ECE = {ece:.3f}, n = {n})", fontsize=10)
        ax_hist.bar(centers, count, width=width, color="0.5", edgecolor="black")
        ax_hist.set_xlabel("top-1 confidence")
        ax_hist.set_ylabel("count")


def plot_image_grid(
    indices: list[int],
    image_loader: ImageLoader,
    titles: list[str],
    path: str | Path,
    suptitle: str,
) -> None:
    """Images in a grid (up to 4 per row), one title each.

    An empty ``indices`` still produces a PNG with a placeholder message so the
    report never has a broken image link.
    """
    if len(titles) != len(indices):
        raise ValueError(f"{len(titles)} titles for {len(indices)} images")
    ncols = max(1, min(4, len(indices)))
    nrows = max(1, math.ceil(len(indices) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(CELL_IN * ncols, 4.0), CELL_IN * nrows + 0.6), squeeze=False)
    with _saved(fig, path):
        flat = axes.ravel()
        if not indices:
            _placeholder(flat[0], "no images in this category")
        for ax, idx, title in zip(flat, indices, titles):
            _show_image(ax, image_loader(int(idx)), title)
        for ax in flat[len(indices) :]:
            ax.axis("off")
        fig.suptitle(_mpl_text(suptitle))


def _plot_class_rows(
    rows: list[tuple[str, list[int], list[str]]],
    image_loader: ImageLoader,
    path: str | Path,
    suptitle: str,
    k: int,
) -> None:
    """One row of up to ``k`` images per class, with the class name on the left.

    Used for the "most correct / most incorrect per class" figures, where a
    class with nothing to show still gets a labelled (empty) row so readers
    can tell "no errors" apart from "not plotted".
    """
    ncols = max(1, k)
    nrows = max(1, len(rows))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(max(CELL_IN * ncols, 4.0) + 0.8, CELL_IN * nrows + 0.6), squeeze=False
    )
    with _saved(fig, path):
        if not rows:
            _placeholder(axes[0, 0], "no classes")
        for r, (label, indices, titles) in enumerate(rows):
            for c in range(ncols):
                ax = axes[r, c]
                if c < len(indices):
                    _show_image(ax, image_loader(int(indices[c])), titles[c])
                elif c == 0:
                    _placeholder(ax, "none")
                else:
                    ax.axis("off")
            # Row label as text (not ylabel) because axis("off") hides ylabels.
            axes[r, 0].text(
                -0.08,
                0.5,
                _mpl_text(label),
                transform=axes[r, 0].transAxes,
                rotation=90,
                ha="right",
                va="center",
                fontsize=10,
                fontweight="bold",
            )
        for ax in axes[len(rows) :].ravel():
            ax.axis("off")
        fig.suptitle(_mpl_text(suptitle))


# --------------------------------------------------------------------------
# report assembly
# --------------------------------------------------------------------------


class _Titler:
    """Builds notebook-style image titles for one set of predictions."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]) -> None:
        self.probs = probs
        self.labels = labels
        self.classes = classes
        self.names = names
        self.pred = probs.argmax(axis=1)

    def __call__(self, i: int, with_loss: bool = False) -> str:
        true = self.classes[int(self.labels[i])]
        pred = self.classes[int(self.pred[i])]
        p_true = float(self.probs[i, int(self.labels[i])])
        lines = [_short_name(self.names[i]), f"p({true})={p_true:.2f} pred={pred}"]
        if with_loss:
            lines.append(f"loss={-math.log(max(p_true, LOG_CLIP)):.2f}")
        return "\n".join(lines)

    def many(self, indices: list[int], with_loss: bool = False) -> list[str]:
        return [self(i, with_loss) for i in indices]


def _json_default(obj: Any) -> Any:
    """Let ``extra`` carry numpy scalars/arrays and paths without a TypeError."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _local_dir(out_dir: str | Path) -> Path:
    # Reports are written with plain file I/O; a URL would otherwise become a
    # strange relative directory like "s3:/bucket/..." without any error.
    text = str(out_dir)
    if "://" in text:
        raise ValueError(f"write_report needs a local directory, got {text!r}")
    path = Path(text).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_grids(
    out: Path,
    grids: dict[str, list[int]],
    titler: _Titler,
    classes: list[str],
    image_loader: ImageLoader,
    k: int,
) -> list[tuple[str, str]]:
    """Render every image grid; returns (file name, caption) pairs in page order."""
    written: list[tuple[str, str]] = []
    idx = grids["random_correct"]
    plot_image_grid(
        idx, image_loader, titler.many(idx), out / "grid_random_correct.png", "Random correctly classified images"
    )
    written.append(("grid_random_correct.png", "Random correct predictions"))

    shown = classes[:MAX_CLASS_ROWS]
    note = "" if len(classes) <= MAX_CLASS_ROWS else f" (first {MAX_CLASS_ROWS} of {len(classes)} classes)"
    for kind, caption in (
        ("most_correct", "Most confident correct predictions per class"),
        ("most_incorrect", "Most confident incorrect predictions per class"),
    ):
        rows = [(name, grids[f"{kind}_{c}"], titler.many(grids[f"{kind}_{c}"])) for c, name in enumerate(shown)]
        _plot_class_rows(rows, image_loader, out / f"grid_{kind}.png", caption + note, k)
        written.append((f"grid_{kind}.png", caption + note))

    idx = grids["most_uncertain"]
    plot_image_grid(
        idx,
        image_loader,
        titler.many(idx),
        out / "grid_most_uncertain.png",
        "Most uncertain predictions (smallest top-2 margin)",
    )
    written.append(("grid_most_uncertain.png", "Most uncertain predictions"))

    idx = grids["top_losses"]
    plot_image_grid(idx, image_loader, titler.many(idx, with_loss=True), out / "top_losses.png", "Top losses")
    written.append(("top_losses.png", "Top losses"))
    return written


def _fmt(value: Any) -> str:
    """Format a metric cell: floats to 4 decimals, everything else as text."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table (dragons.htmlkit: every cell escaped), metrics to 4 places."""
    return htmlkit.table(header, rows, fmt=_fmt)


def _top_loss_rows(
    indices: list[int], probs: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]
) -> list[list[Any]]:
    """Table rows naming the top-loss files, so they can be found and relabelled."""
    pred = probs.argmax(axis=1)
    rows: list[list[Any]] = []
    for i in indices:
        p_true = float(probs[i, labels[i]])
        rows.append([i, names[i], classes[labels[i]], classes[pred[i]], p_true, -math.log(max(p_true, LOG_CLIP))])
    return rows


_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _render_html(
    title: str,
    metrics: dict[str, Any],
    classes: list[str],
    images: list[tuple[str, str]],
    top_losses: list[list[Any]],
    calibration_note: str | None = None,
) -> str:
    """Assemble the self-contained index page (inline CSS, relative links).

    ``calibration_note``: a paragraph set just before the first reliability diagram.
    """
    summary = _table(
        ["metric", "value"],
        [[key, metrics[key]] for key in ("n", "accuracy", "errors", "log_loss", "ece", "macro_f1")],
    )
    per_class = _table(
        ["class", "precision", "recall", "f1", "support"],
        [[name, s["precision"], s["recall"], s["f1"], s["support"]] for name, s in metrics["per_class"].items()],
    )
    cm = _table(
        ["actual \\ predicted", *classes],
        [[name, *row] for name, row in zip(classes, metrics["confusion_matrix"])],
    )
    parts: list[Any] = [
        htmlkit.tag("h2", "Summary"),
        summary,
        htmlkit.tag("h2", "Per class"),
        per_class,
        htmlkit.tag("h2", "Confusion matrix"),
        cm,
    ]
    extra = metrics.get("extra") or {}
    if extra:
        rows = [[key, json.dumps(value, default=_json_default)] for key, value in extra.items()]
        parts += [htmlkit.tag("h2", "Extra"), _table(["key", "value"], rows)]
    if top_losses:
        parts += [
            htmlkit.tag("h2", "Top losses"),
            _table(["index", "file", "actual", "predicted", "p(actual)", "loss"], top_losses),
        ]
    parts.append(htmlkit.tag("h2", "Figures"))
    for file_name, caption in images:
        if calibration_note and file_name.startswith("reliability"):
            # Beside the diagrams it explains: which calibration case applied, with its held-out figures.
            parts.append(htmlkit.tag("p", calibration_note, class_="calibration"))
            calibration_note = None
        picture = htmlkit.tag("a", htmlkit.img(file_name, caption), href=quote(file_name))
        parts.append(htmlkit.tag("figure", htmlkit.join([picture, htmlkit.tag("figcaption", caption)])))
    return htmlkit.page(title, parts, css=_CSS)


def write_report(
    out_dir: str | Path,
    *,
    probs: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    names: list[str],
    image_loader: ImageLoader,
    history: list[dict[str, Any]] | None = None,
    lr_find: dict[str, Any] | None = None,
    title: str = "dragons evaluation",
    extra: dict[str, Any] | None = None,
    k: int = 4,
    raw_probs: np.ndarray | None = None,
    temperature: float = 1.0,
    calibration_note: str | None = None,
) -> Path:
    """Write metrics.json, all diagnostic PNGs and index.html into ``out_dir``.

    ``image_loader(i)`` must return sample ``i`` as an HxWx3 uint8 array; it
    is only called for the handful of images that appear in a grid, so it can
    lazily read from disk. Returns the path of ``index.html``.
    ``raw_probs``: the same predictions before temperature scaling (``probs``
    are after, at ``temperature``): a second reliability diagram shows the change.
    ``calibration_note``: how that temperature was chosen (dragons.calibration.describe),
    printed beside the reliability diagrams.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if len(names) != p.shape[0]:
        raise ValueError(f"got {len(names)} names for {p.shape[0]} predictions")
    out = _local_dir(out_dir)

    # Metrics first: they validate the inputs before any plotting work.
    metrics = classification_metrics(p, y, classes)
    metrics["extra"] = redact_obj(dict(extra)) if extra else {}  # extra may carry configs and URIs
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n", encoding="utf-8")

    images: list[tuple[str, str]] = []
    if lr_find is not None:
        plot_lr_find(list(lr_find["lrs"]), list(lr_find["losses"]), lr_find.get("suggestion"), out / "lr_find.png")
        images.append(("lr_find.png", "Learning-rate finder"))
    if history is not None:
        plot_training_curves(history, out / "training_curves.png")
        images.append(("training_curves.png", "Training curves"))
    plot_confusion_matrix(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    images.append(("confusion_matrix.png", "Confusion matrix"))
    if raw_probs is not None:
        plot_reliability(
            np.asarray(raw_probs, dtype=np.float64),
            y,
            out / "reliability_uncalibrated.png",
            title="Before calibration (T = 1)",
        )
        images.append(("reliability_uncalibrated.png", "Reliability diagram before calibration (raw softmax)"))
        plot_reliability(p, y, out / "reliability.png", title=f"After calibration (T = {temperature:.3g})")
        images.append(("reliability.png", f"Reliability diagram after calibration (temperature {temperature:.3g})"))
    else:
        plot_reliability(p, y, out / "reliability.png")
        images.append(("reliability.png", "Reliability diagram"))

    grids = select_grids(p, y, k=k)
    titler = _Titler(p, y, classes, names)
    images += _write_grids(out, grids, titler, classes, image_loader, k)

    top = _top_loss_rows(grids["top_losses"], p, y, classes, names)
    index = out / "index.html"
    index.write_text(_render_html(title, metrics, classes, images, top, calibration_note), encoding="utf-8")
    return index


# ----------------------------------------------------------------- from predictions
PREDICTIONS_FILE = "predictions.csv"


def _loader(uris: list[str], side: int) -> Any:
    def load(i: int) -> np.ndarray:
        try:
            return decode_to_base(storage.read_bytes(uris[i]), side)
        except (ImageError, DragonsError):
            return np.zeros((side, side, 3), dtype=np.uint8)

    return load


def _write_predictions(path: str, uris: list[str], labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> None:
    """Every image's probabilities beside the report, for a person's own analysis."""
    # `label` is the prediction, as in every output; the folder's class is `true_label`.
    pred = prediction_columns(classes, probs, [None] * len(uris))
    pred.pop("error")
    cols: dict[str, Any] = {"uri": uris, "true_label": [classes[int(y)] for y in labels], **pred}
    pcsv.write_csv(pa.table(cols), path)


def report_from_predictions(
    report_uri: str,
    meta: dict[str, Any],
    uris: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    history: list[dict[str, Any]] | None = None,
    lr_find: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    raw_probs: np.ndarray | None = None,
) -> str:
    """Write the HTML report for given predictions; returns the index.html URI."""
    names = [u.rsplit("/", 1)[-1] for u in uris]
    info = {"model_version": meta.get("version"), "arch": meta.get("arch"), **(extra or {})}
    # Which calibration case the model's T came from (older artifacts: T alone, fitted in-sample).
    note = describe_calibration(meta.get("calibration"), meta.get("temperature"))
    if raw_probs is not None and float(meta.get("temperature", 1.0)) != 1.0:
        # The diagram after applies the final T to the very images it was fitted on: say which figures are held out.
        note += (
            " The diagram after calibration applies that T to the same images (in-sample); "
            "the out-of-fold figures are the held-out ones."
        )
    with tempfile.TemporaryDirectory() as tmp:
        _write_predictions(os.path.join(tmp, PREDICTIONS_FILE), uris, labels, probs, list(meta["classes"]))
        write_report(
            tmp,
            probs=probs,
            labels=labels,
            classes=list(meta["classes"]),
            names=names,
            image_loader=_loader(uris, 192),
            history=history,
            lr_find=lr_find,
            title=f"dragons: {meta.get('arch')} on {len(uris)} validation images",
            extra=info,
            raw_probs=raw_probs,
            temperature=float(meta.get("temperature", 1.0)),
            calibration_note=note,
        )
        storage.upload_dir(tmp, report_uri)
    return storage.join(report_uri, "index.html")
