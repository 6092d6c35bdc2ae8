"""A prediction as columns, the one layout every output uses (the scores table,
``dragons predict``, evaluate's predictions.csv): ``label`` is always the
predicted class, ``score`` its probability, one ``p_<class>`` per class, and
``error`` on an image that could not be scored. Class names become column names
here, and training refuses colliding class sets before any work."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from dragons.errors import DragonsError


def prob_column(cls: str) -> str:
    """``p_<class>`` with anything but letters, digits and _ replaced: a plain SQL name."""
    return "p_" + re.sub(r"[^0-9A-Za-z_]", "_", cls)


def check_classes(classes: list[str]) -> None:
    """Refuse class sets whose ``p_<class>`` columns collide (``a-b`` and ``a_b``).

    Called at train time (before any work) and again at score time for artifacts
    trained before the check existed. SQL engines compare column names without
    case, so names differing only in case collide too.
    """
    seen: dict[str, str] = {}
    for c in classes:
        col = prob_column(c).lower()
        if col in seen:
            raise DragonsError(
                f"classes {seen[col]!r} and {c!r} both map to the table column {prob_column(c)!r}: "
                "rename one of the class folders (only letters, digits and '_' survive in column names)"
            )
        seen[col] = c


# The novelty score's column (dragons.novelty): NULL on error rows and for models without statistics.
NOVELTY = "novelty"


def prediction_columns(
    classes: list[str], probs: np.ndarray, errors: Sequence[str | None], novelty: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """``label``, ``score``, ``error`` and ``p_<class>`` for a batch; an error row has
    no label and NaN probabilities (``probs`` may hold anything there). With ``novelty``
    (one value a row) a ``novelty`` column too, NaN on error rows."""
    p = np.asarray(probs, dtype=np.float64).reshape(len(errors), len(classes))
    ok = np.array([not e for e in errors], dtype=bool)
    top = np.where(ok, np.nan_to_num(p, nan=-1).argmax(1), -1) if len(p) else np.zeros(0, dtype=np.int64)
    out: dict[str, np.ndarray] = {
        "label": np.array([classes[t] if t >= 0 else None for t in top], dtype=object),
        "score": np.where(ok, np.nan_to_num(p, nan=0).max(1) if len(p) else np.zeros(0), np.nan),
        "error": np.array([e if e else None for e in errors], dtype=object),
    }
    for j, c in enumerate(classes):
        out[prob_column(c)] = np.where(ok, p[:, j], np.nan)
    if novelty is not None:  # after the probabilities, as the table and the scorer's refused rows have it
        out[NOVELTY] = np.where(ok, np.asarray(novelty, dtype=np.float64).reshape(len(errors)), np.nan)
    return out
