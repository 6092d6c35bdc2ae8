"""Model versions and aliases with no server (dragons.loop.versions): a training's --out
is a registry, aliases move by conditional writes, scoring pins the version a run is bound to.

Registries are built with ``artifact.save(..., register=True)`` (what ``dragons train``
calls) on two tiny untrained models: training would take minutes and prove nothing more.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers_hardening import IMAGE_SIZE, jpeg, rows_of, save_tiny_model

from dragons import artifact, storage
from dragons.dataconfig import DataConfig
from dragons.errors import DragonsError
from dragons.loop import versions
from dragons.models.registry import build_model, get_spec


def _model(seed: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(seed)
    spec = get_spec("efficientnet_lite0")
    model = build_model("efficientnet_lite0", 2, weights="none").eval()
    data = DataConfig.create(IMAGE_SIZE, 0.875, spec.mean, spec.std)
    return model, {
        "arch": "efficientnet_lite0",
        "classes": ["ants", "bees"],
        "data_config": data.to_dict(),
        "metrics": {"valid_accuracy": 0.5 + seed / 100},
    }


@pytest.fixture(scope="module")
def models() -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """Two models with different weights (so two versions)."""
    return [_model(1), _model(2)]


def _train_like(root: str, models: list[tuple[torch.nn.Module, dict[str, Any]]]) -> list[str]:
    """What `dragons train --out ROOT` does twice: two versions, latest at the second."""
    return [artifact.save(root, m, dict(meta), register=True)["version"] for m, meta in models]


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty registry root on disk or on S3."""
    if request.param == "local":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/registries/{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory: pytest.TempPathFactory, models) -> tuple[str, str, str]:
    root = str(tmp_path_factory.mktemp("versions") / "registry")
    return (root, *_train_like(root, models))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def s3_registry(bucket: str, models) -> tuple[str, str, str]:
    root = f"s3://{bucket}/registries/shared"
    return (root, *_train_like(root, models))  # type: ignore[return-value]


@pytest.fixture(params=["local", "s3"])
def registry(request: pytest.FixtureRequest) -> tuple[str, str, str]:
    """(ROOT, version A, version B): two trainings into one registry, built once a module per
    backend (writing 14 MB weights to moto takes seconds); each test moves its own aliases."""
    return request.getfixturevalue(f"{request.param}_registry")  # type: ignore[no-any-return]


def test_training_output_is_a_registry(root: str, models):
    a, b = _train_like(root, models)
    assert a != b
    # Today's layout is untouched: ROOT itself is the newest training.
    assert artifact.read_meta(root)["version"] == b
    # ... and every version has its own immutable copy; latest points at the newest.
    for v in (a, b):
        assert artifact.read_meta(versions.version_dir(root, v))["version"] == v
    assert versions.aliases(root) == {"latest": b}
    if not root.startswith("s3://"):  # the weights too (load checks them); on S3 the scoring test loads them
        latest = artifact.load(f"{root}@latest")
        assert latest.version == b and latest.uri == storage.parse(versions.version_dir(root, b)).uri
    assert versions.resolve(f"{root}@latest").dir == versions.version_dir(root, b)
    assert artifact.read_meta(f"{root}@{a}")["version"] == a
    assert artifact.read_meta(f"{root}@{a[:8]}")["version"] == a  # a unique prefix names a version too
    infos = versions.list_versions(root)
    assert {i.version: i.aliases for i in infos} == {a: [], b: ["latest"]}
    assert all(i.registered and i.created and i.arch == "efficientnet_lite0" for i in infos)
    assert {i.version: i.metrics["valid_accuracy"] for i in infos} == {a: 0.51, b: 0.52}
    # Saving A again: its folder is not rewritten (created_at kept), latest moves back to it.
    kept = storage.read_bytes(storage.join(versions.version_dir(root, a), "model.json"))
    assert _train_like(root, models[:1]) == [a]
    assert storage.read_bytes(storage.join(versions.version_dir(root, a), "model.json")) == kept
    assert versions.aliases(root)["latest"] == a
    assert [(h["alias"], h["from"], h["to"]) for h in versions.history(root)] == [
        ("latest", None, a),
        ("latest", a, b),
        ("latest", b, a),
    ]


def test_promote_show_and_history(registry: tuple[str, str, str]):
    root, a, b = registry
    p = versions.promote(root, a, "prod", actor="alice")
    assert (p.alias, p.version, p.previous, p.actor, p.changed) == ("prod", a, None, "alice", True)
    assert artifact.read_meta(f"{root}@prod")["version"] == a
    q = versions.promote(root, "latest", "prod", actor="bob")  # an alias names its version
    assert (q.version, q.previous, q.changed) == (b, a, True) and q.seq == p.seq + 1
    assert "-> " + b in q.sentence(root) and "bob" in q.sentence(root)
    again = versions.promote(root, b, "prod", actor="carol")
    assert not again.changed and "nothing changed" in again.sentence(root)
    shown = versions.show(root, "prod")
    assert shown["version"] == b and {"latest", "prod"} <= set(shown["aliases"]) and shown["meta"]["version"] == b
    assert [(h["from"], h["to"], h["actor"]) for h in shown["promotions"] if h["alias"] == "prod"] == [(a, b, "bob")]
    hist = [h for h in versions.history(root) if h["alias"] == "prod"]
    assert [(h["from"], h["to"], h["actor"]) for h in hist] == [(None, a, "alice"), (a, b, "bob")]
    assert all(h["at"].endswith("Z") for h in hist)
    (line,) = [ln for ln in versions.describe(versions.list_versions(root)).splitlines() if ln.startswith(b)]
    assert "prod" in line and "0.5200" in line
    with pytest.raises(DragonsError, match="no version 'feedfacefeedface' in ") as err:
        versions.promote(root, "feedfacefeedface")
    assert a in str(err.value) and b in str(err.value) and f"prod -> {b}" in str(err.value)
    with pytest.raises(DragonsError, match="is not a valid name"):
        versions.promote(root, a, alias="bad name")
    with pytest.raises(DragonsError, match=rf"@prod points at {b}, not {a} \(--expect\)"):
        versions.promote(root, a, "prod", expect=a)
    assert versions.aliases(root)["prod"] == b


def test_resolve_errors_name_what_exists(registry: tuple[str, str, str]):
    root, a, b = registry
    versions.promote(root, a, "canary")
    with pytest.raises(DragonsError) as err:
        artifact.load(f"{root}@staging")
    text = str(err.value)
    assert "no alias or version 'staging'" in text and f"canary -> {a}" in text and f"latest -> {b}" in text
    assert "dragons model promote --registry" in text and "--alias staging" in text
    with pytest.raises(DragonsError, match="no model registry at"):
        versions.resolve(storage.join(root, "nowhere") + "@prod")
    with pytest.raises(DragonsError, match="ROOT@alias"):
        versions.resolve(f"{root}@")
    # A plain folder's name may hold an '@': it is still that folder.
    odd = storage.join(root, "team@night")
    save_tiny_model(odd)
    assert versions.resolve(odd).dir == odd and artifact.read_meta(odd)["version"] == versions.resolve(odd).version


def test_artifact_from_before_registries(tmp_path: Path):
    """Today's artifacts (no versions/, no aliases.json) load as before, by folder or ROOT@version,
    list as one unregistered version, and a promotion registers them first."""
    old = str(tmp_path / "old")
    v = save_tiny_model(old)["version"]
    assert not (tmp_path / "old" / "versions").exists() and not (tmp_path / "old" / "aliases.json").exists()
    assert artifact.load(old).version == v and versions.resolve(old).version == v
    assert artifact.read_meta(f"{old}@{v}")["version"] == v
    (info,) = versions.list_versions(old)
    assert (info.version, info.registered, info.aliases) == (v, False, [])
    with pytest.raises(DragonsError, match=rf"no alias or version 'prod' .*{v} \(only in model.json\)"):
        versions.resolve(f"{old}@prod")
    versions.promote(old, v[:8], "prod")
    assert (tmp_path / "old" / "versions" / v / "model.pt").read_bytes() == (tmp_path / "old" / "model.pt").read_bytes()
    assert artifact.load(f"{old}@prod").uri == str(tmp_path / "old" / "versions" / v)
    (info,) = versions.list_versions(old)
    assert (info.registered, info.aliases) == (True, ["prod"])


def test_training_into_an_old_artifact_keeps_it(tmp_path: Path, models):
    """The first training into a folder written before registries keeps the model it replaces
    (perhaps the one the nights score) as a version instead of losing it."""
    old = str(tmp_path / "old")
    v = save_tiny_model(old)["version"]
    (new,) = _train_like(old, models[:1])
    assert artifact.read_meta(old)["version"] == new
    assert {i.version: (i.registered, i.aliases) for i in versions.list_versions(old)} == {
        v: (True, []),
        new: (True, ["latest"]),
    }
    assert artifact.read_meta(f"{old}@{v}")["version"] == v


def _race(
    root: str, jobs: list[Callable[[], Any]], serialize_puts: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Any], int]:
    """Run ``jobs`` on threads so that every one has read aliases.json before any writes it
    (the worst interleaving, forced: a barrier at each thread's first write). Returns each
    job's result or exception, and how many writes were tried.

    ``serialize_puts`` (S3): moto's conditional PUT checks the ETag and then stores, without
    a lock: two PUTs in the same instant can both pass (measured: 1 race in 200 with moto
    5.2.6). AWS S3 applies conditional writes atomically ("the first write to finish
    succeeds"), so the PUTs go one at a time here, as S3 orders them; the ETag check decides."""
    real = versions._write_state
    barrier, lock, first = threading.Barrier(len(jobs), timeout=30), threading.Lock(), threading.local()

    writes: list[int] = []

    def write(r: str, state: dict[str, Any], token: str | None) -> bool:
        writes.append(1)
        if not getattr(first, "done", False):
            first.done = True
            barrier.wait()
        if serialize_puts:
            with lock:
                return real(r, state, token)
        return real(r, state, token)

    monkeypatch.setattr(versions, "_write_state", write)
    out: list[Any] = [None] * len(jobs)

    def run(i: int) -> None:
        try:
            out[i] = jobs[i]()
        except Exception as exc:  # noqa: BLE001 (the test looks at it)
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, len(writes)


def test_two_concurrent_promotions_one_wins(registry: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch):
    root, a, b = registry
    out, writes = _race(
        root,
        [
            lambda: versions.promote(root, a, "race", actor="alice"),
            lambda: versions.promote(root, b, "race", actor="bob"),
        ],
        root.startswith("s3://"),
        monkeypatch,
    )
    assert writes == 2  # both tried to write what they had read: the conditional write refused one
    won = [r for r in out if isinstance(r, versions.Promotion)]
    lost = [r for r in out if isinstance(r, DragonsError)]
    assert len(won) == 1 and len(lost) == 1, out
    assert won[0].changed and versions.aliases(root)["race"] == won[0].version
    assert "another promotion of" in str(lost[0]) and "@race won" in str(lost[0])
    assert "dragons model list" in str(lost[0]) and won[0].actor in str(lost[0])
    assert [(h["to"], h["actor"]) for h in versions.history(root) if h["alias"] == "race"] == [
        (won[0].version, won[0].actor)
    ]


def test_other_alias_moving_meanwhile_is_no_conflict(registry: tuple[str, str, str], monkeypatch: pytest.MonkeyPatch):
    """Two aliases changed at once (a training moving `latest` while prod is promoted): both land;
    the loser of the write reads again and writes again, since the alias it changes did not move."""
    root, a, b = registry
    out, writes = _race(
        root,
        [lambda: versions.promote(root, b, "blue"), lambda: versions.promote(root, a, "green")],
        root.startswith("s3://"),
        monkeypatch,
    )
    assert writes == 3  # one write refused, read again, written again
    assert all(isinstance(r, versions.Promotion) and r.changed for r in out), out
    assert {k: versions.aliases(root)[k] for k in ("blue", "green")} == {"blue": b, "green": a}
    assert sorted((h["alias"], h["to"]) for h in versions.history(root)[-2:]) == [("blue", b), ("green", a)]


def test_scoring_pins_the_version_a_run_is_bound_to(
    s3_registry: tuple[str, str, str], bucket: str, ray_session: None, tmp_path: Path
):
    from dragons.score.cli import run_score
    from dragons.score.config import ScoreConfig

    root, a, b = s3_registry
    versions.promote(root, a, "nightly", actor="alice")
    images, out = f"s3://{bucket}/versions-images", f"s3://{bucket}/tables/versions"
    for i in range(3):
        storage.write_bytes(f"{images}/{i}.jpg", jpeg(i))

    def night(run_id: str, log: str) -> dict[str, Any]:
        return run_score(
            ScoreConfig(model=f"{root}@nightly", input=images, output=out, run_id=run_id, log_file=str(tmp_path / log))
        )

    assert night("n1", "first.log")["rows"] == 3
    assert {r["model_version"] for r in rows_of(out, "n1")} == {a}
    versions.promote(root, b, "nightly", actor="bob")
    for i in range(3, 5):  # more images arrive; the same night is run again
        storage.write_bytes(f"{images}/{i}.jpg", jpeg(i))
    assert night("n1", "again.log")["rows"] == 5
    assert [r["model_version"] for r in rows_of(out, "n1")] == [a] * 5
    said = (tmp_path / "again.log").read_text()
    assert f"run n1 is bound to version {a}; @nightly is now {b}; continuing with {a}" in said
    night("n2", "second.log")
    assert {r["model_version"] for r in rows_of(out, "n2")} == {b}
    # The run records the folder it scored with and the alias it came through.
    from dragons.score import table

    infos = [h for h in table.open_table(out).history() if h.get("dragons_run_id") == "n2" and h.get("model")]
    assert infos and infos[0]["model"] == versions.version_dir(root, b) and infos[0]["model_ref"] == f"{root}@nightly"
    # A plain folder holding another version is still refused for a bound run.
    with pytest.raises(DragonsError, match="was started with something else"):
        run_score(
            ScoreConfig(
                model=versions.version_dir(root, b),
                input=images,
                output=out,
                run_id="n1",
                log_file=str(tmp_path / "refused.log"),
            )
        )
    assert json.loads(storage.read_bytes(storage.join(root, "aliases.json")))["aliases"]["nightly"] == b
