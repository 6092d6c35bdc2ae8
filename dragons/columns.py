"""Class names as column names: ``p_<class>``, shared by training (which refuses
colliding class sets before any work), reports and the scores table."""

from __future__ import annotations

import re

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
