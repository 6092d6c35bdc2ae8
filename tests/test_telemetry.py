"""A night on Grafana (issue 31 item 6): dragons' series reach Ray's metrics endpoint
with the run id, and the dashboard in cluster/grafana/ is Grafana's shape and reads
exactly those series."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from dragons import storage, telemetry
from dragons.score.config import ScoreConfig

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "cluster" / "grafana" / "dragons-dashboard.json"
CONFIGMAP = REPO / "cluster" / "grafana" / "dragons-dashboard-configmap.yaml"
COUNTERS = {"dragons_rows_scored", "dragons_row_errors", "dragons_parts_committed"}


def _exported() -> set[str]:
    """The Prometheus names of every series dragons defines (Ray's prefix; counters end in _total)."""
    names = {*telemetry.SCORE_SERIES, *telemetry.TRAIN_SERIES}
    return {telemetry.PREFIX + n + ("_total" if n in COUNTERS else "") for n in names}


def test_dashboard_is_grafana_json_over_our_series_and_its_configmap_matches() -> None:
    from grafana_foundation_sdk.models.dashboard import Dashboard  # Grafana's own dashboard types

    raw = json.loads(DASHBOARD.read_text())
    dash = Dashboard.from_json(raw)
    assert dash.title and dash.uid == "dragons-runs" and raw["schemaVersion"] >= 36
    assert dash.panels and len(dash.panels) == len(raw["panels"])
    used: set[str] = set()
    for panel, p in zip(dash.panels, raw["panels"]):
        assert panel.type_val in {"timeseries", "stat"} and panel.title, p
        g = panel.grid_pos
        assert g is not None and 0 <= g.x < 24 and g.x + g.w <= 24 and g.h > 0, p["title"]
        assert p["targets"] and len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        for t in p["targets"]:
            series = set(re.findall(r"\bray_dragons_\w+", t["expr"]))
            assert series and series <= _exported(), (p["title"], series - _exported())
            used |= series
    assert used == _exported(), f"series no panel shows: {_exported() - used}"
    variables = {v["name"] for v in raw["templating"]["list"]}
    assert {"datasource", "run_id", "train_run"} <= variables
    cm = yaml.safe_load(CONFIGMAP.read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["dragons-dashboard.json"]) == raw


def _metrics_text() -> str:
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def _series(text: str, name: str, **labels: str) -> list[float]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def test_a_run_shows_on_the_metrics_endpoint_by_run_id(
    ray_session: None, tiny_model: str, bucket: str, tmp_path: Path
) -> None:
    from helpers_hardening import jpeg

    from dragons.score.cli import run_score

    prefix = f"s3://{bucket}/telemetry"
    for i in range(12):
        storage.write_bytes(f"{prefix}/img{i:02d}.jpg", jpeg(i))
    storage.write_bytes(f"{prefix}/broken.jpg", b"not a jpeg")
    seen_running: list[str] = []
    done = threading.Event()

    def watch() -> None:  # Ray's agent exports every few seconds: read while the run goes on
        while not done.is_set():
            try:
                text = _metrics_text()
            except OSError:
                text = ""
            if _series(text, "ray_dragons_run_state", run_id="metrics-night", state="running") == [1.0]:
                seen_running.append(text)
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run_score(
        ScoreConfig(
            model=tiny_model,
            input=prefix,
            output=str(tmp_path / "t"),
            run_id="metrics-night",
            commit_every=5,
            progress_s=1,
            report=False,
        )
    )
    time.sleep(1)
    done.set()
    watcher.join(timeout=30)

    train = telemetry.TrainMetrics("metrics-train")
    train.epoch({"epoch": 2, "train_loss": 0.5, "valid_loss": 0.25, "accuracy": 0.875})
    deadline, text = time.time() + 60, ""
    while time.time() < deadline:  # the final values, once the agent has exported them
        text = _metrics_text()
        if (
            _series(text, "ray_dragons_rows_scored_total", run_id="metrics-night") == [13.0]
            and _series(text, "ray_dragons_run_state", run_id="metrics-night", state="complete") == [1.0]
            and _series(text, "ray_dragons_train_accuracy", run="metrics-train")
        ):
            break
        time.sleep(1)
    assert _series(text, "ray_dragons_rows_scored_total", run_id="metrics-night") == [13.0], text[-3000:]
    assert _series(text, "ray_dragons_row_errors_total", run_id="metrics-night", kind="not_an_image") == [1.0]
    assert sum(_series(text, "ray_dragons_parts_committed_total", run_id="metrics-night")) >= 2
    assert _series(text, "ray_dragons_keys_listed", run_id="metrics-night") == [13.0]
    assert _series(text, "ray_dragons_run_state", run_id="metrics-night", state="running") == [0.0]
    assert _series(text, "ray_dragons_train_loss", run="metrics-train", split="valid") == [0.25]
    assert _series(text, "ray_dragons_train_accuracy", run="metrics-train") == [0.875]
    assert seen_running, "the run's state was never seen as running on the endpoint while it ran"
