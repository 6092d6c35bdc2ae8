"""``dragons export``: a run's least sure images as a labelling batch.

The images a model is least sure of are the ones a person's label teaches it
most. This writes the ``N`` least sure rows of one run (rows without error:
lowest top score first, ties by the smaller top-2 margin) as Label Studio
tasks with the model's prediction pre-filled, or as CSV. ``--per-class``
balances the batch across predicted classes (``N // classes`` from each, the
rest from the least sure overall), so a rare class is not crowded out by a
common one's borderline cases.

``--novel N`` adds (or, alone, sends) the run's ``N`` most novel rows: the images
the model's training set had nothing like (dragons.novelty), after the least
sure ones and never twice; their CSV rows and tasks carry ``novelty``.

Only ``N`` rows are read: Top-N queries through the query layer
(``runreport.least_sure`` / ``runreport.per_class`` / ``runreport.most_novel``), never the run.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

from dragons import storage
from dragons.errors import DragonsError
from dragons.score import export
from dragons.score.export import safe_cell  # CSV cells that open as text, not formulas
from dragons.score.query import QueryLimits
from dragons.score.runreport import (
    RunReader,
    class_counts,
    least_sure,
    list_runs,
    most_novel,
    per_class,
)

LABEL_FORMATS = [
    "label-studio",
    "csv",
]  # dragons export --format (a labelling batch, not a query result); the first is the default
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


def select(
    table_uri: str,
    run_id: str,
    n: int | None,
    per_class_: bool = False,
    limits: QueryLimits | None = None,
    novel: int | None = None,
) -> list[dict[str, Any]]:
    """The rows to label: {uri, label, score, margin, model_version[, novelty]}: the ``n`` least
    sure first, then the ``novel`` most novel not already taken (most novel first)."""
    if n is not None and n < 1:
        raise DragonsError(f"--uncertain {n}: give the number of images to export (1 or more)")
    if novel is not None and novel < 1:
        raise DragonsError(f"--novel {novel}: give the number of novel images to export (1 or more)")
    if n is None and novel is None:
        raise DragonsError("dragons export: say which images: --uncertain N, --novel N or both")
    reader = RunReader(table_uri, limits)
    try:
        shown = storage.redact(table_uri)
        if run_id not in {r["run_id"] for r in list_runs(reader)}:
            raise DragonsError(
                f"run {run_id!r} is not in the table {shown}: give one of its runs with --run-id "
                f"(`dragons query --table {shown}` lists them)"
            )
        rows = [] if not n else balanced(reader, run_id, n) if per_class_ else least_sure(reader, run_id, n)
        if novel:
            if not reader.has_novelty:
                raise DragonsError(
                    f"--novel: the table {shown} has no novelty column (it was written before "
                    "dragons scored novelty): score the run again with a model trained by this dragons"
                )
            found = most_novel(reader, run_id, novel, exclude={r["uri"] for r in rows})
            if not found and not rows:
                raise DragonsError(
                    f"--novel: run {run_id!r} has no novelty scores (its model was trained without "
                    "novelty statistics): retrain the model with this dragons and score again"
                )
            rows += found
        return rows
    finally:
        reader.close()


def label_studio_tasks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Label Studio's import format: one task per image, the model's label as a
    pre-annotation (``predictions``) a person accepts or corrects.

    The model's answer sits in ``data`` as ``model_label``/``model_score``, never under
    the control's own name (``label``): JSON_MIN exports copy ``data`` into every record
    and write the person's choice over the control's key, so a key named ``label`` would
    turn the model's guess into a human label whenever an annotation had no choice."""
    return [
        {
            "data": {
                "image": r["uri"],
                "model_label": r["label"],
                "model_score": r["score"],
                **({"novelty": r["novelty"]} if r.get("novelty") is not None else {}),
            },
            "predictions": [
                {
                    "model_version": r.get("model_version") or "",
                    "score": r["score"],
                    "result": [
                        {
                            "from_name": FROM_NAME,
                            "to_name": TO_NAME,
                            "type": "choices",
                            "value": {"choices": [r["label"]]},
                        }
                    ],
                }
            ],
        }
        for r in rows
    ]


def render(rows: list[dict[str, Any]], fmt: str, novelty: bool = False) -> bytes:
    """The batch as bytes; ``novelty``: CSV gets a ``novelty`` column (empty for rows without one)."""
    if fmt == "label-studio":
        return (json.dumps(label_studio_tasks(rows), indent=1) + "\n").encode("utf-8")
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(CSV_COLUMNS + (["novelty"] if novelty else []))
    w.writerows(
        [
            [safe_cell(r["uri"]), safe_cell(r["label"]), f"{r['score']:.6f}", f"{r['margin']:.6f}"]
            + ([f"{r['novelty']:.6f}" if r.get("novelty") is not None else ""] if novelty else [])
            for r in rows
        ]
    )
    return text.getvalue().encode("utf-8")


def check_format(fmt: str) -> None:
    if fmt not in LABEL_FORMATS:
        raise DragonsError(f"--format {fmt!r}: choose one of {', '.join(LABEL_FORMATS)}")


def write_export(
    table_uri: str,
    run_id: str,
    n: int | None,
    fmt: str = LABEL_FORMATS[0],
    out: str | None = None,
    per_class_: bool = False,
    limits: QueryLimits | None = None,
    novel: int | None = None,
) -> int:
    """Write the batch to the local file ``out`` (complete, or not at all) or stdout; returns its rows.
    ``n``: the least sure rows (None: none), ``novel``: the most novel rows after them (None: none)."""
    check_format(fmt)
    path = export.check_target("csv", out)  # the same --out checks as `dragons query` (local, folder exists)
    rows = select(table_uri, run_id, n, per_class_, limits, novel)
    data = render(rows, fmt, novelty=novel is not None)
    if path is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        with export.atomic_file(path) as f:
            f.write(data)
    return len(rows)
