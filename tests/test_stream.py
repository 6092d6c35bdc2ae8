"""The streaming data path: shards disjoint and complete, batch counts equal, reproducible."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_hardening import Shard

from dragons.runlog import Progress
from dragons.train.stream import StreamShard, shard_rows, split_sizes


@pytest.mark.parametrize("n", [0, 1, 2, 17, 100, 1001])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_row_once_per_epoch_across_ranks(n: int, world: int) -> None:
    bs = 8
    for epoch in range(3):
        shards = [shard_rows(n, r, world, seed=7, epoch=epoch, shuffle=True) for r in range(world)]
        seen = np.concatenate(shards)
        assert len(seen) == n and set(seen.tolist()) == set(range(n))  # disjoint and complete
        steps = max(1, math.ceil(max(len(s) for s in shards) / bs))
        plans = [split_sizes(len(s), steps) for s in shards]
        assert all(len(p) == steps for p in plans)  # every rank joins every collective step
        assert all(sum(p) == len(s) and max(p) - min(p) <= 1 and max(p) <= bs for p, s in zip(plans, shards))
    # A new order each epoch, the same order for the same seed and epoch.
    if n > 10:
        assert not np.array_equal(shard_rows(n, 0, world, 7, 0, True), shard_rows(n, 0, world, 7, 1, True))
        assert np.array_equal(shard_rows(n, 0, world, 7, 1, True), shard_rows(n, 0, world, 7, 1, True))


def test_in_memory_shard_yields_each_image_once() -> None:
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 4, 4).contiguous()
    shard = Shard(x, torch.arange(10) % 2, torch.arange(10) + 100, seed=3)
    got = [b for b in shard.batches(4, shuffle=True, epoch=1)]
    assert [len(b[2]) for b in got] == [4, 3, 3]
    ids = torch.cat([b[2] for b in got])
    assert sorted(ids.tolist()) == list(range(100, 110))
    assert all(torch.equal(b[0][:, 0, 0, 0].long() + 100, b[2]) for b in got)  # images travel with their ids


def test_stream_shards_decode_every_image_once(ray_session: None, workdir: Path) -> None:
    """Two ranks' StreamShards over a real folder: decoded in Ray Data actors (GPU
    clusters) and in the worker itself (CPU clusters), the same batches both ways."""
    from dragons.data import discover
    from dragons.local.synth import write_dataset

    root = workdir / "stream"
    write_dataset(str(root), ["a", "b"], n_train=13, n_valid=2, seed=5, size=(90, 70))
    folder = discover(str(root))
    rows = {
        "uri": np.array([s.uri for s in folder.train], dtype=object),
        "label": np.array([s.label for s in folder.train]),
        "idx": np.arange(len(folder.train)),
    }
    shards = [StreamShard(rows, r, 2, base_size=48, max_pixels=10**8, seed=1) for r in range(2)]
    for epoch in (0, 1):
        seen = []
        for s in shards:
            batches = list(s.batches(4, shuffle=True, epoch=epoch))
            assert len(batches) == math.ceil(len(s) / 4)
            for x, y, idx in batches:
                assert x.dtype == torch.uint8 and x.shape[1:] == (3, 48, 48) and x.float().std() > 0
                assert torch.equal(y, torch.from_numpy(rows["label"][idx.numpy()]))
                seen += idx.tolist()
        assert sorted(seen) == list(range(26))  # each of the 26 images exactly once per epoch
    # Reproducible: the same seed and epoch stream the same rows in the same order.
    a = [i.tolist() for _, _, i in shards[0].batches(4, shuffle=True, epoch=1)]
    b = [i.tolist() for _, _, i in shards[0].batches(4, shuffle=True, epoch=1)]
    assert a == b
    # Decoded in the worker (decode_actors=0, what CPU clusters use): the same rows,
    # order and pixels as from the Ray Data actors.
    here = [StreamShard(rows, r, 2, base_size=48, max_pixels=10**8, seed=1, decode_actors=0) for r in range(2)]
    for ray_data, local in zip(shards, here):
        for (xa, ya, ia), (xb, yb, ib) in zip(
            ray_data.batches(4, shuffle=True, epoch=1), local.batches(4, shuffle=True, epoch=1), strict=True
        ):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)


def test_progress_lines(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress("epoch 1 unfrozen", 100, every_s=0.0, scale=2)
    p.update(10)
    p.update(20)
    p.finish()
    quiet = Progress("other rank", 100, enabled=False, every_s=0.0)
    quiet.update(50)
    quiet.finish()
    lines = capsys.readouterr().err.splitlines()  # the run's lines are on stderr: stdout carries results
    assert len(lines) == 3 and all(line.startswith("epoch 1 unfrozen") for line in lines)
    assert "20/100 images" in lines[0] and "60/100 images" in lines[1] and "ETA" in lines[1]
    assert "100/100 images" in lines[2] and "images/s" in lines[2] and lines[2].endswith("done")


def test_one_run_log_for_both_wings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Scoring's progress (total unknown while the listing goes on) and training's
    share one Progress and one log: terminal lines, and the file with UTC times;
    details and Ray's worker lines in the file only."""
    import logging
    import re

    from dragons.runlog import ray_output, run_log, say

    with run_log(str(tmp_path / "logs" / "run.log")) as path:
        p = Progress("scored", None, every_s=0.0)
        p.update(40, note="0 errors, listing goes on")
        p.finish(total=40, note="1 errors")
        say("an operator's detail", detail=True)
        ray_output.info("(RayTrainWorker pid=1) a line of Ray's")
    say("after the run")  # the file is closed: terminal only
    err = capsys.readouterr().err.splitlines()
    assert (
        err[0].startswith("scored  40 images") and "listing goes on" in err[0] and "/" not in err[0].split("images")[0]
    )
    assert err[1].startswith("scored  40/40 images") and err[1].endswith("done  (1 errors)")
    assert err[2] == "after the run" and len(err) == 3
    text = open(path).read().splitlines()
    assert len(text) == 4 and all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in text)
    assert text[2].endswith("an operator's detail") and text[3].endswith("a line of Ray's")
    assert not logging.getLogger("dragons").propagate


def test_capped_passes_sample_every_class() -> None:
    """``max_images`` (benchmarks) caps a pass with a seeded sample, not the first (one-class) rows."""
    rows = {
        "uri": np.array([f"u{i}" for i in range(1000)], dtype=object),
        "label": np.repeat(np.arange(5), 200),
        "idx": np.arange(1000),
    }
    s = StreamShard(rows, 0, 2, base_size=32, max_pixels=10**8, seed=1, limit=50)
    plain = s.positions(0, False)
    assert len(s) == 50 and len(plain) == 50 and np.array_equal(plain, s.positions(3, False))  # the same rows each pass
    assert set(rows["label"][plain].tolist()) == set(range(5)) and np.all(np.diff(plain) > 0)
    assert len(s.positions(1, True)) == 50


def test_empty_batch_trains_with_zero_gradients() -> None:
    """A rank whose shard is one row short can get an empty batch; it must not poison the model."""
    from helpers_hardening import head_only_settings

    from dragons.train.config import TrainConfig
    from dragons.train.schedule import one_cycle
    from dragons.train.worker import Worker

    cfg = TrainConfig(data="x", out="y", image_size=32, batch_size=1, **head_only_settings())
    w = Worker(cfg, ["a", "b"], None, torch.device("cpu"))
    empty = Shard(
        torch.zeros(0, 3, 40, 40, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )
    before = [p.detach().clone() for p in w.model.parameters()]
    opt = torch.optim.SGD(w.model.parameters(), lr=0.1)
    w.set_frozen(False)
    w.train_images(empty, opt, one_cycle(opt, [0.1], 2), frozen=False, net=w.model)
    assert all(torch.isfinite(p).all() for p in w.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, w.model.parameters()))


def test_decode_actors_fit_beside_the_workers() -> None:
    """2 CPUs, 2 workers at 0.75 CPU: one 0.25-CPU decode actor each (two would
    not fit and the pass would wait); a large node gets more, up to the cap."""
    from dragons.raycluster import DATA_CPU_SHARE
    from dragons.train.stream import DECODE_ACTOR_CPUS, MAX_DECODE_ACTORS, decode_actors_per_worker

    assert decode_actors_per_worker(2, 2, DATA_CPU_SHARE) == 1
    assert 2 * 0.75 + 2 * 1 * DECODE_ACTOR_CPUS <= 2
    assert decode_actors_per_worker(16, 2, DATA_CPU_SHARE) == 4 == MAX_DECODE_ACTORS
    assert decode_actors_per_worker(1, 4, DATA_CPU_SHARE) == 1  # never zero
