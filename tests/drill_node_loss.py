"""Run in a subprocess by tests/test_drills.py: a 2-node Ray cluster on this
machine (ray.cluster_utils.Cluster, own RAY_TMPDIR), a node killed while
dragons scores on it, then another node added and killed while dragons trains
on it. Prints one JSON line per drill with what happened.

    python tests/drill_node_loss.py score MODEL INPUT OUTPUT RUN_ID [train DATA OUT STORAGE]
    python tests/drill_node_loss.py train DATA OUT STORAGE

One cluster for both drills: its start and the driver's imports (torch, Ray)
are paid once; the training drill's worker node is a fresh one either way.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import dragons  # noqa: F401  (token auth before ray is imported)

NODE = {"num_cpus": 2, "object_store_memory": 150 * 1024 * 1024}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def node_args() -> dict:
    """Each node's agents on ports of their own: the test session's Ray holds the defaults."""
    return {
        **NODE,
        "dashboard_agent_listen_port": _free_port(),
        "metrics_export_port": _free_port(),
        "runtime_env_agent_port": _free_port(),
    }


def main() -> None:
    from ray.cluster_utils import Cluster

    drills = _drills(sys.argv[1:])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **node_args(),
            "include_dashboard": os.environ.get("DRILL_DASHBOARD", "1") == "1",
            "dashboard_port": _free_port(),
        },
    )
    os.environ["RAY_ADDRESS"] = cluster.address  # dragons' ensure_ray joins it
    try:
        for mode, args in drills:
            victim = cluster.add_node(**node_args())  # a fresh worker node for each drill
            cluster.wait_for_nodes()
            events: dict = {"killed": None, "added": False}
            out = (_score if mode == "score" else _train)(cluster, victim, events, *args)
            print(f"DRILL {mode} " + json.dumps({**events, **out}), flush=True)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def _drills(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``score`` takes 4 arguments, ``train`` 3; either or both, in order."""
    drills, arity = [], {"score": 4, "train": 3}
    while argv:
        mode = argv[0]
        if mode not in arity or len(argv) < 1 + arity[mode]:
            raise SystemExit(__doc__)
        drills.append((mode, argv[1 : 1 + arity[mode]]))
        argv = argv[1 + arity[mode] :]
    return drills


def _kill_during(cluster, victim, events: dict, ready, work, replace: bool):  # type: ignore[no-untyped-def]
    """Run ``work`` in a thread; kill ``victim`` from this (main) thread once ``ready()``:
    Ray starts a node's processes only from the main thread (signal handlers)."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.time() + 240
    while t.is_alive() and time.time() < deadline and events["killed"] is None:
        if ready():
            events["killed"] = time.time()
            cluster.remove_node(victim, allow_graceful=False)  # SIGKILL its raylet and workers
            if replace:  # what an autoscaler does: a fresh node takes the lost one's place
                time.sleep(3)
                # Twice the CPUs: the lost worker group's bundle on the head is only
                # released once its placement group is removed, which Ray retries
                # against the dead node for a while; the new group must fit meanwhile.
                cluster.add_node(**{**node_args(), "num_cpus": 2 * NODE["num_cpus"]})
                events["added"] = True
        time.sleep(0.2)
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _score(cluster, victim, events: dict, model: str, input_: str, output: str, run_id: str) -> dict:  # type: ignore[no-untyped-def]
    from dragons.score.pipeline import ScoreConfig, score

    log = f"/tmp/drill-node-{os.getpid()}.log"
    # Kill once rows are flowing: the progress log has its first "scored" line.
    m = _kill_during(
        cluster,
        victim,
        events,
        lambda: os.path.exists(log) and "scored " in open(log).read(),
        lambda: score(
            ScoreConfig(
                model=model,
                input=input_,
                output=output,
                run_id=run_id,
                batch_size=4,
                actors=2,
                progress_s=0.3,
                log_file=log,
                no_progress_timeout_s=240,
            )
        ),
        replace=False,
    )
    return {"listed": m["listed"], "rows": m["rows"], "errors": m["errors"]}


def _train(cluster, victim, events: dict, data: str, out: str, storage_uri: str) -> dict:  # type: ignore[no-untyped-def]
    from dragons.train.checkpoint import latest_checkpoint
    from dragons.train.config import TrainConfig
    from dragons.train.run import train

    run_dir = f"{storage_uri.rstrip('/')}/drill"

    def checkpointed() -> bool:
        try:
            found = latest_checkpoint(run_dir)
        except Exception:
            return False
        return found is not None and found[1]["epochs_done"] >= 1

    cfg = TrainConfig(
        data=data,
        out=out,
        storage=storage_uri,
        name="drill",
        workers=2,
        image_size=64,
        epochs=2,
        head_epochs=3,
        head_views=0,
        batch_size=8,
        report=False,
        max_failures=1,
        no_progress_timeout_s=240,
    )
    meta = _kill_during(cluster, victim, events, checkpointed, lambda: train(cfg).meta, replace=True)
    return {"resumes": meta["resumes"], "epochs": len(meta["history"]), "accuracy": meta["metrics"]["valid_accuracy"]}


if __name__ == "__main__":
    main()
