"""``dragons compare``: a challenger (B) against its champion (A) on the same labelled images.

Both models score every image through the one inference path (``predict_uris``,
each with its own calibration temperature); an image either model cannot decode
is left out for both, so the two accuracies are over the same rows and the
paired test below is valid. The figures are ``dragons.metrics``' (accuracy, ECE,
per-class precision and recall); the paired test is the exact McNemar test on
the images where exactly one model is right.

The verdict: B beats A when ``gain = acc_B - acc_A`` is positive and at least
``min_gain``. Significance is NOT required by default (``max_p = 1.0``): with a
few hundred labelled images a real one-point gain rarely reaches p < 0.05, and a
promotion gate that never opens gets switched off; give ``max_p`` (e.g. 0.05) to
require it. ``CompareResult.exit_code`` is 0 when B beats A, else 3.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from dragons import artifact, storage
from dragons.data import VALID_DIRS
from dragons.errors import DragonsError
from dragons.images import is_image_name
from dragons.metrics import classification_metrics
from dragons.predictor import predict_uris

EXIT_BEATS, EXIT_NOT_BEATEN = 0, 3
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
# Above this many discordant pairs the exact sum is done in log space (big-integer
# binomial coefficients of n ~ 10^6 would take minutes; the float sum is exact enough).
EXACT_INTEGER_LIMIT = 20_000


@dataclass
class ModelFigures:
    """One model's figures on the compared images (per_class over CompareResult.classes)."""

    given: str  # the model as named on the command line (a path, s3:// or ROOT@alias)
    uri: str  # the artifact it resolved to
    version: str
    classes: list[str]  # the model's own classes
    temperature: float
    accuracy: float
    correct: int
    ece: float
    per_class: dict[str, dict[str, float | int]]  # class -> precision, recall, f1, support


@dataclass
class McNemar:
    """The exact McNemar test: b = A right & B wrong, c = A wrong & B right."""

    b: int
    c: int
    both_right: int
    both_wrong: int
    p_value: float

    def sentence(self) -> str:
        """The test in words, for the report and the CLI."""
        n = self.b + self.c
        if n == 0:
            return (
                "The models are right and wrong on exactly the same images (b = c = 0): "
                "no evidence either way (exact McNemar p = 1)."
            )
        return (
            f"Of the images where exactly one model is right, A alone is right on b = {self.b} "
            f"and B alone on c = {self.c}. Exact McNemar test (two-sided binomial on {n} "
            f"discordant images): p = {self.p_value:.4g}, the chance of a split at least this "
            "uneven if the two models were equally accurate."
        )


@dataclass
class Disagreement:
    """An image where A and B predict different classes."""

    uri: str
    label: str
    pred_a: str
    p_a: float  # A's probability of its prediction
    pred_b: str
    p_b: float

    @property
    def kind(self) -> str:
        """'b_right' (B right, A wrong), 'a_right' or 'both_wrong'."""
        if self.pred_b == self.label:
            return "b_right"
        return "a_right" if self.pred_a == self.label else "both_wrong"


@dataclass
class CompareResult:
    model_a: ModelFigures
    model_b: ModelFigures
    data: str
    source: str  # which images: "valid/ split", "all class folders" or "table (uri,label)"
    classes: list[str]  # the class axis of the per-class figures: A's classes, then B's others
    n: int  # images compared (both models scored them)
    unreadable: list[tuple[str, str]]  # (uri, error) left out for both models
    unlabelled: int  # table rows with an empty label, skipped
    mcnemar: McNemar
    gain: float  # acc_B - acc_A
    min_gain: float
    max_p: float
    disagreements: list[Disagreement]
    notes: list[str] = field(default_factory=list)
    out: str | None = None
    report: str | None = None  # index.html's URI when written

    @property
    def beats(self) -> bool:
        """B beats A: a positive gain of at least min_gain, and p <= max_p (1 = not required).
        A property, so ``dataclasses.replace(result, min_gain=...)`` re-decides without re-scoring."""
        return self.gain > 0 and self.gain >= self.min_gain and self.mcnemar.p_value <= self.max_p

    @property
    def exit_code(self) -> int:
        return EXIT_BEATS if self.beats else EXIT_NOT_BEATEN

    def verdict(self) -> str:
        """One line: whether B beats A, and the figures that decided it."""
        word = "beats" if self.beats else "does not beat"
        why = f"gain {self.gain:+.4f} {'>=' if self.gain >= self.min_gain else '<'} min gain {self.min_gain:.4f}"
        if self.max_p < 1.0:  # significance required
            p = self.mcnemar.p_value
            why += f", McNemar p {p:.4g} {'<=' if p <= self.max_p else '>'} max p {self.max_p:g}"
        return f"B {word} A: {why}"

    def lines(self) -> list[str]:
        """What the CLI prints, one line each (URIs redacted)."""
        skipped = f"; {len(self.unreadable)} unreadable image(s) left out for both" if self.unreadable else ""
        if self.unlabelled:
            skipped += f"; {self.unlabelled} unlabelled row(s) skipped"
        out = [f"compare: {self.n} labelled images from {storage.redact(self.data)} ({self.source}){skipped}"]
        for name, m in (("A", self.model_a), ("B", self.model_b)):
            out.append(
                f"{name} {storage.redact(m.given)} (version {m.version}): accuracy {m.accuracy:.4f} "
                f"({m.correct}/{self.n}), ECE {m.ece:.4f}"
            )
        mc = self.mcnemar
        out.append(
            f"McNemar exact: b={mc.b} (A right, B wrong), c={mc.c} (B right, A wrong), p={mc.p_value:.4g}; "
            f"{len(self.disagreements)} image(s) where the predictions differ"
        )
        out += [f"note: {n}" for n in self.notes]
        out.append(f"{self.verdict()} -> exit {self.exit_code}")
        if self.report:
            out.append(f"report: {storage.redact(self.report)}")
        return out

    def to_json(self) -> dict[str, Any]:
        """summary.json: every figure, redacted."""
        doc = asdict(self)
        doc["unreadable"] = [{"uri": u, "error": e} for u, e in self.unreadable]
        doc["disagreements"] = [{**asdict(d), "kind": d.kind} for d in self.disagreements]
        doc["mcnemar"]["n_discordant"] = self.mcnemar.b + self.mcnemar.c
        doc.update(verdict=self.verdict(), beats=self.beats, exit_code=self.exit_code)
        # Short keys for scripts (docs/loop.md: jq -r .b.version summary.json promotes what won).
        for key, m in (("a", self.model_a), ("b", self.model_b)):
            doc[key] = {"given": m.given, "uri": m.uri, "version": m.version, "accuracy": m.accuracy}
        return dict(storage.redact_obj(doc))


# ----------------------------------------------------------------------------- the test


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), without scipy (not a dependency)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if n <= EXACT_INTEGER_LIMIT:
        total, term = 0, 1  # term = C(n, i), exact integers
        for i in range(k + 1):
            total += term
            term = term * (n - i) // (i + 1)
        return total / (1 << n)  # int / int: correctly rounded even for huge values
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: min(1, 2 * BinomCDF(min(b, c); b + c, 1/2))."""
    if b < 0 or c < 0:
        raise ValueError(f"McNemar counts must be >= 0, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf_half(min(b, c), b + c))


# ----------------------------------------------------------------------------- the data


def _read_table(data: str) -> tuple[list[str], list[str], int]:
    """(uris, labels, unlabelled rows) from a CSV or Parquet of ``uri,label``.

    Relative URIs are relative to the table's folder, so a table kept beside its
    images works from anywhere. Extra columns (score, margin, ...) are ignored.
    """
    raw = storage.read_bytes(data)
    try:
        if data.lower().endswith(".csv"):
            # Every column as text: labels like "1" or "007" must stay as written.
            table = pcsv.read_csv(
                io.BytesIO(raw),
                convert_options=pcsv.ConvertOptions(
                    column_types={"uri": "string", "label": "string"}, strings_can_be_null=True
                ),
            )
        else:
            table = pq.read_table(io.BytesIO(raw))
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError: a malformed file
        raise DragonsError(
            f"cannot read {storage.redact(data)} as a table of uri,label: {storage.shorten(str(exc))}"
        ) from None
    missing = [c for c in ("uri", "label") if c not in table.column_names]
    if missing:
        raise DragonsError(
            f"{storage.redact(data)} lacks the column(s) {missing} (it has {table.column_names}): "
            "give a CSV or Parquet with columns uri,label (one labelled image a row)"
        )
    base = storage.parse(data).uri.rsplit("/", 1)[0]
    uris: list[str] = []
    labels: list[str] = []
    unlabelled = 0
    seen: dict[str, str] = {}
    for row, (uri, label) in enumerate(zip(table.column("uri").to_pylist(), table.column("label").to_pylist()), 2):
        uri = "" if uri is None else str(uri).strip()
        label = "" if label is None else str(label).strip()
        if not uri:
            raise DragonsError(f"{storage.redact(data)} row {row} has an empty uri: every row needs an image URI")
        if not label:
            unlabelled += 1  # a task nobody labelled yet: nothing to compare against
            continue
        if "://" not in uri and not os.path.isabs(uri):
            uri = storage.join(base, uri)
        uri = storage.parse(uri).uri if not uri.startswith("s3://") else uri  # local: absolute; S3 keys verbatim
        if uri in seen:
            if seen[uri] != label:
                raise DragonsError(
                    f"{storage.redact(data)} labels {storage.redact(uri)} both {seen[uri]!r} and "
                    f"{label!r}: keep one label per image"
                )
            continue
        seen[uri] = label
        uris.append(uri)
        labels.append(label)
    if not uris:
        raise DragonsError(
            f"{storage.redact(data)} has no labelled rows ({unlabelled} unlabelled): label some images first"
        )
    return uris, labels, unlabelled


def _read_folder(data: str) -> tuple[list[str], list[str], str]:
    """(uris, labels, source) from an image folder: its valid/ split (``root/valid/<class>/``),
    or every image of a bare ``root/<class>/`` folder. Listed here rather than through
    dragons.data.discover, whose random split would hold back part of a bare folder
    (and all of a class with one image). A train/ folder without valid/ is refused:
    its images are what the models trained on."""
    root = storage.parse(data).uri.rstrip("/")
    nested: dict[str, dict[str, list[str]]] = {}  # top folder (lower case) -> class -> URIs
    bare: dict[str, list[str]] = {}
    for entry in storage.list_files(root):
        parts = entry.uri[len(root) :].strip("/").split("/")
        if not is_image_name(parts[-1]):
            continue
        if len(parts) == 2:
            bare.setdefault(parts[0], []).append(entry.uri)
        elif len(parts) >= 3:
            nested.setdefault(parts[0].lower(), {}).setdefault(parts[1], []).append(entry.uri)
    valid = next((nested[d] for d in VALID_DIRS if d in nested), None)
    if valid:
        groups, source = valid, "valid/ split"
    elif bare:
        groups, source = bare, "all class folders"
    elif "train" in nested:
        raise DragonsError(
            f"{storage.redact(data)} has train/ but no valid/ folder: compare on held-out images "
            "(a valid/ folder, a folder of <class>/ subfolders, or a uri,label table)"
        )
    else:
        raise DragonsError(
            f"{storage.redact(data)} has no images in <class>/ or valid/<class>/ folders: "
            "give a folder of labelled images or a uri,label CSV/Parquet"
        )
    pairs = sorted((u, c) for c, us in groups.items() for u in us)
    return [u for u, _ in pairs], [c for _, c in pairs], source


def labelled_images(data: str) -> tuple[list[str], list[str], str, int]:
    """(uris, labels, source, unlabelled) for ``data``: an image folder or a uri,label table."""
    if not data:
        raise DragonsError("no labelled data given: pass --data with an image folder or a uri,label CSV/Parquet")
    if data.lower().endswith(TABLE_SUFFIXES):
        if not storage.exists(data):
            raise DragonsError(f"{storage.redact(data)} does not exist: give a CSV or Parquet of uri,label")
        uris, labels, unlabelled = _read_table(data)
        return uris, labels, "table (uri,label)", unlabelled
    uris, labels, source = _read_folder(data)
    return uris, labels, source, 0


# ----------------------------------------------------------------------------- comparing


def _aligned(probs: np.ndarray, own: list[str], classes: list[str]) -> np.ndarray:
    """A model's probabilities as columns of the shared class axis (0 for a class it lacks),
    so argmax is still its own prediction and dragons.metrics applies unchanged."""
    out = np.zeros((probs.shape[0], len(classes)), dtype=np.float64)
    for j, name in enumerate(own):
        out[:, classes.index(name)] = probs[:, j]
    return out


def _figures(given: str, art: Any, probs: np.ndarray, y: np.ndarray, classes: list[str]) -> ModelFigures:
    m = classification_metrics(probs, y, classes)
    return ModelFigures(
        given=given,
        uri=art.uri,
        version=art.version,
        classes=art.classes,
        temperature=art.temperature,
        accuracy=float(m["accuracy"]),
        correct=m["n"] - m["errors"],
        ece=float(m["ece"]),
        per_class=m["per_class"],
    )


def _class_axis(labels: list[str], a: list[str], b: list[str], data: str) -> tuple[list[str], list[str]]:
    """The shared class axis and notes; a label neither model knows is an error."""
    classes = a + [c for c in b if c not in a]
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise DragonsError(
            f"{storage.redact(data)} has label(s) {unknown} that neither model knows "
            f"(A: {a}, B: {b}): relabel those images or leave them out"
        )
    notes: list[str] = []
    if a != b:
        lack_a = sorted(set(labels) - set(a))
        lack_b = sorted(set(labels) - set(b))
        notes.append(
            f"A and B know different classes (A: {a}, B: {b}); a label a model lacks counts as wrong "
            f"for it (A lacks {lack_a or 'none'}, B lacks {lack_b or 'none'})"
        )
    return classes, notes


def _scored(art: Any, uris: list[str], tta: int, batch_size: int) -> tuple[np.ndarray, list[str]]:
    probs, errors = predict_uris(art, uris, tta=tta, batch_size=batch_size)
    return np.asarray(probs, dtype=np.float64), errors


def compare(
    model_a: str, model_b: str, data: str, min_gain: float = 0.0, max_p: float = 1.0, tta: int = 0, batch_size: int = 32
) -> CompareResult:
    """Score ``data``'s labelled images with champion ``model_a`` and challenger ``model_b``
    and compare them (``dragons.loop.comparereport.write`` writes the page and summary.json)."""
    if not 0.0 <= min_gain <= 1.0:
        raise DragonsError(f"--min-gain {min_gain}: give an accuracy gain between 0 and 1 (e.g. 0.01 = one point)")
    if not 0.0 < max_p <= 1.0:
        raise DragonsError(f"--max-p {max_p}: give a p-value in (0, 1]; 1 (the default) does not require significance")
    uris, labels, source, unlabelled = labelled_images(data)
    art_a, art_b = artifact.load(model_a), artifact.load(model_b)
    classes, notes = _class_axis(labels, art_a.classes, art_b.classes, data)

    probs_a, err_a = _scored(art_a, uris, tta, batch_size)
    probs_b, err_b = _scored(art_b, uris, tta, batch_size)
    ok = np.array([not (ea or eb) for ea, eb in zip(err_a, err_b)], dtype=bool)
    unreadable = [(u, ea or eb) for u, ea, eb in zip(uris, err_a, err_b) if ea or eb]
    if not ok.any():
        raise DragonsError(
            f"none of the {len(uris)} images in {storage.redact(data)} could be decoded "
            f"(first: {storage.redact(unreadable[0][0])}: {unreadable[0][1]})"
        )
    uris = [u for u, k in zip(uris, ok) if k]
    labels = [lab for lab, k in zip(labels, ok) if k]
    y = np.array([classes.index(lab) for lab in labels], dtype=np.int64)
    pa = _aligned(probs_a[ok], art_a.classes, classes)
    pb = _aligned(probs_b[ok], art_b.classes, classes)
    fig_a = _figures(model_a, art_a, pa, y, classes)
    fig_b = _figures(model_b, art_b, pb, y, classes)

    pred_a, pred_b = pa.argmax(1), pb.argmax(1)
    right_a, right_b = pred_a == y, pred_b == y
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    test = McNemar(
        b=b,
        c=c,
        both_right=int(np.sum(right_a & right_b)),
        both_wrong=int(np.sum(~right_a & ~right_b)),
        p_value=mcnemar_exact(b, c),
    )
    differ = [
        Disagreement(
            uri=uris[i],
            label=labels[i],
            pred_a=classes[pred_a[i]],
            p_a=float(pa[i, pred_a[i]]),
            pred_b=classes[pred_b[i]],
            p_b=float(pb[i, pred_b[i]]),
        )
        for i in np.flatnonzero(pred_a != pred_b)
    ]
    # From counts, not acc_B - acc_A: one division is correctly rounded, so a gain of exactly
    # --min-gain (3/10 against 0.3) is not lost to a 1e-17 subtraction error.
    gain = (fig_b.correct - fig_a.correct) / len(y)
    result = CompareResult(
        model_a=fig_a,
        model_b=fig_b,
        data=storage.redact(data),
        source=source,
        classes=classes,
        n=len(y),
        unreadable=unreadable,
        unlabelled=unlabelled,
        mcnemar=test,
        gain=gain,
        min_gain=min_gain,
        max_p=max_p,
        disagreements=differ,
        notes=notes,
    )
    return result
