"""A night on Grafana: dragons' own series, exported through Ray's metrics.

Teams that run Ray already scrape its metrics endpoint (every node's metrics
agent; KubeRay names the port ``metrics``, 8080) for Ray's own Grafana
dashboards. ``ray.util.metrics`` puts dragons' series on that same endpoint, so
nothing new listens and nothing new is scraped: Prometheus sees them as
``ray_dragons_*``, labelled by ``run_id`` (scoring) or ``run`` (training).
``cluster/grafana/dragons-dashboard.json`` draws them (docs/operations.md).

A metric must never fail a night: without Ray, or when Ray refuses a value,
each call is a no-op with a debug line.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dragons.rowerrors import ERROR_KIND

log = logging.getLogger(__name__)

# The series and what they mean; the dashboard and the test read these names.
SCORE_SERIES: dict[str, str] = {
    "dragons_rows_scored": "rows committed-bound from the scoring actors (errors included)",
    "dragons_row_errors": "error rows, by kind (the text before ':' in the error column)",
    "dragons_parts_committed": "parts (Delta commits) of the run's rows",
    "dragons_keys_listed": "objects listed so far",
    "dragons_rows_per_second": "the run's scoring rate since its pipeline started",
    "dragons_run_state": "1 for the run's current state (running, complete, failed), 0 for the others",
}
TRAIN_SERIES: dict[str, str] = {
    "dragons_train_epoch": "the epoch last finished",
    "dragons_train_loss": "the last epoch's loss, by split (train, valid)",
    "dragons_train_accuracy": "the last epoch's validation accuracy",
}
RUN_STATES = ("running", "complete", "failed")
PREFIX = "ray_"  # what Ray's exporter puts before every user series


def _make(kind: str, name: str, description: str, tags: tuple[str, ...]) -> Any:
    try:
        from ray.util import metrics  # Ray is there whenever a run is

        cls = {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind]
        return cls(name, description=description, tag_keys=tags)
    except Exception as exc:  # noqa: BLE001 (no Ray, no metrics: the run goes on)
        log.debug("metric %s not created: %s", name, exc)
        return None


def _call(metric: Any, method: str, value: float, tags: Mapping[str, str]) -> None:
    if metric is None:
        return
    try:
        getattr(metric, method)(value, tags=dict(tags))
    except Exception as exc:  # noqa: BLE001
        log.debug("metric update refused: %s", exc)


def error_kinds(kinds: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Error rows by kind, from the rows' ``error_kind`` column (dragons.rowerrors)."""
    if kinds.null_count == len(kinds):
        return {}
    return {str(v["values"]): int(v["counts"]) for v in pc.value_counts(kinds.drop_null()).to_pylist()}


class ScoreMetrics:
    """One scoring run's series (created once; each call adds or sets a value)."""

    def __init__(self, run_id: str) -> None:
        self.tags = {"run_id": run_id}
        d = SCORE_SERIES
        self.rows = _make("counter", "dragons_rows_scored", d["dragons_rows_scored"], ("run_id",))
        self.errors = _make("counter", "dragons_row_errors", d["dragons_row_errors"], ("run_id", "kind"))
        self.parts = _make("counter", "dragons_parts_committed", d["dragons_parts_committed"], ("run_id",))
        self.keys = _make("gauge", "dragons_keys_listed", d["dragons_keys_listed"], ("run_id",))
        self.speed = _make("gauge", "dragons_rows_per_second", d["dragons_rows_per_second"], ("run_id",))
        self.states = _make("gauge", "dragons_run_state", d["dragons_run_state"], ("run_id", "state"))

    def scored(self, batch: pa.Table) -> None:
        _call(self.rows, "inc", batch.num_rows, self.tags)
        try:
            kinds = error_kinds(batch.column(ERROR_KIND))
        except Exception as exc:  # noqa: BLE001 (a count that cannot be made is not worth a night)
            log.debug("error kinds not counted: %s", exc)
            return
        for kind, n in kinds.items():
            _call(self.errors, "inc", n, {**self.tags, "kind": kind})

    def committed(self) -> None:
        _call(self.parts, "inc", 1, self.tags)

    def progress(self, listed: int | None, rows_per_s: float) -> None:
        if listed is not None:
            _call(self.keys, "set", listed, self.tags)
        _call(self.speed, "set", rows_per_s, self.tags)

    def state(self, state: str) -> None:
        for s in RUN_STATES:
            _call(self.states, "set", 1.0 if s == state else 0.0, {**self.tags, "state": s})


class TrainMetrics:
    """One training run's series, set from the driver as each epoch's figures arrive."""

    def __init__(self, run: str) -> None:
        self.tags = {"run": run}
        d = TRAIN_SERIES
        self.epochs = _make("gauge", "dragons_train_epoch", d["dragons_train_epoch"], ("run",))
        self.loss = _make("gauge", "dragons_train_loss", d["dragons_train_loss"], ("run", "split"))
        self.accuracy = _make("gauge", "dragons_train_accuracy", d["dragons_train_accuracy"], ("run",))

    def epoch(self, row: Mapping[str, Any]) -> None:
        """One row of the training history (``epoch``, ``train_loss``, ``valid_loss``, ``accuracy``)."""
        if row.get("epoch") is not None:
            _call(self.epochs, "set", float(row["epoch"]), self.tags)
        for split in ("train", "valid"):
            if row.get(f"{split}_loss") is not None:
                _call(self.loss, "set", float(row[f"{split}_loss"]), {**self.tags, "split": split})
        if row.get("accuracy") is not None:
            _call(self.accuracy, "set", float(row["accuracy"]), self.tags)
