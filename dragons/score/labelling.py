"""``dragons export``: a run's least sure images as a labelling batch.

The images a model is least sure of are the ones a person's label teaches it
most. This writes the ``N`` least sure rows of one run (rows without error:
lowest top score first, ties by the smaller top-2 margin) as Label Studio
tasks with the model's prediction pre-filled, or as CSV. ``--per-class``
balances the batch across predicted classes (``N // classes`` from each, the
rest from the least sure overall), so a rare class is not crowded out by a
common one's borderline cases.

Only ``N`` rows are read: Top-N queries through the query layer
(``runreport.least_sure`` / ``runreport.per_class``), never the run.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

from dragons import storage
from dragons.errors import DragonsError
from dragons.score.query import QueryLimits
from dragons.score.runreport import RunReader, class_counts, least_sure, list_runs, per_class

FORMATS = ["label-studio", "csv"]  # dragons export --format; the first is the default
CSV_COLUMNS = ["uri", "label", "score", "margin"]
# The names the Label Studio labelling config in docs/reports.md gives its tags.
FROM_NAME, TO_NAME = "label", "image"


def balanced(reader: RunReader, run_id: str, n: int) -> list[dict[str, Any]]:
    """``n // classes`` least sure rows from each predicted class, then the least sure
    rows overall not yet taken until there are ``n`` (a class with fewer rows than
    its share leaves its room to them too). Least sure first."""
    classes = class_counts(reader, run_id)  # the classes the run predicted
    quota = n // len(classes) if classes else 0
    picked = [e for items in per_class(reader, run_id, quota, surest=False).values() for e in items] if quota else []
    taken = {e["uri"] for e in picked}
    picked += least_sure(reader, run_id, n - len(picked), exclude=taken)
    return sorted(picked, key=lambda e: (e["score"], e["margin"], e["uri"]))


def select(table_uri: str, run_id: str, n: int, per_class_: bool = False,
           limits: QueryLimits | None = None) -> list[dict[str, Any]]:
    """The rows to label: {uri, label, score, margin, model_version}, least sure first."""
    if n < 1:
        raise DragonsError(f"--uncertain {n}: give the number of images to export (1 or more)")
    reader = RunReader(table_uri, limits)
    try:
        if run_id not in {r["run_id"] for r in list_runs(reader)}:
            shown = storage.redact(table_uri)
            raise DragonsError(f"run {run_id!r} is not in the table {shown}: give one of its runs with --run-id "
                               f"(`dragons query --table {shown}` lists them)")
        return balanced(reader, run_id, n) if per_class_ else least_sure(reader, run_id, n)
    finally:
        reader.close()


def label_studio_tasks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label Studio's import format: one task per image, the model's label as a
    pre-annotation (``predictions``) a person accepts or corrects."""
    return [{
        "data": {"image": r["uri"], "label": r["label"], "score": r["score"]},
        "predictions": [{
            "model_version": r.get("model_version") or "", "score": r["score"],
            "result": [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices",
                        "value": {"choices": [r["label"]]}}],
        }],
    } for r in rows]


def render(rows: list[dict[str, Any]], fmt: str) -> bytes:
    from dragons.score.export import safe_cell  # CSV cells that open as text, not formulas

    if fmt == "label-studio":
        return (json.dumps(label_studio_tasks(rows), indent=1) + "\n").encode("utf-8")
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    w.writerows([[safe_cell(r["uri"]), safe_cell(r["label"]), f"{r['score']:.6f}", f"{r['margin']:.6f}"] for r in rows])
    return text.getvalue().encode("utf-8")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise DragonsError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def write_export(table_uri: str, run_id: str, n: int, fmt: str = FORMATS[0], out: str | None = None,
                 per_class_: bool = False, limits: QueryLimits | None = None) -> int:
    """Write the batch to the local file ``out`` (complete, or not at all) or stdout; returns its rows."""
    from dragons.score import export

    check_format(fmt)
    path = export.check_target("csv", out)  # the same --out checks as `dragons query` (local, folder exists)
    rows = select(table_uri, run_id, n, per_class_, limits)
    data = render(rows, fmt)
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with export.atomic_file(path) as f:
            f.write(data)
    return len(rows)
