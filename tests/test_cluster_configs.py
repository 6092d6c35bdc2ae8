"""Static checks for the cluster / operations configuration under cluster/.

Fast and hermetic: nothing here starts Ray, talks to Kubernetes or AWS. It
parses the YAML, checks the security invariants (token auth everywhere, no
dashboard on all interfaces, S3 secrets only via secretKeyRef / name
references), checks that entrypoints point at real job scripts, and exercises
cluster/submit.sh against a stub `ray` executable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
OPS_DOC = REPO / "docs" / "operations.md"
SUBMIT = CLUSTER / "submit.sh"
LAUNCHER = CLUSTER / "ray-cluster-aws.yaml"
S3_SECRET = "dragons-s3"
RAY_VERSION = "2.58.1"
RUN_DATE_PLACEHOLDER = "__RUN_DATE__"

YAML_FILES = sorted(p for p in CLUSTER.rglob("*") if p.suffix in {".yaml", ".yml"})


def _load(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _manifests() -> Iterator[tuple[str, dict]]:
    """Every Kubernetes object in cluster/, plus manifests embedded in
    ConfigMaps (the nightly RayJob template, rendered with a sample date)."""
    for path in YAML_FILES:
        if path == LAUNCHER:
            continue
        for doc in _load(path):
            if not isinstance(doc, dict) or "kind" not in doc:
                continue
            yield path.name, doc
            if doc["kind"] == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if not key.endswith((".yaml", ".yml")):
                        continue
                    rendered = text.replace(RUN_DATE_PLACEHOLDER, "2000-01-31")
                    for sub in yaml.safe_load_all(rendered):
                        if isinstance(sub, dict) and "kind" in sub:
                            yield f"{path.name}:{key}", sub


MANIFESTS = list(_manifests())


def _ray_cluster_specs() -> list[tuple[str, str, dict]]:
    """(where, kind, RayClusterSpec) for every RayCluster / RayJob / RayCronJob."""
    out = []
    for where, doc in MANIFESTS:
        if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
            continue
        kind, spec = doc["kind"], doc.get("spec") or {}
        if kind == "RayCluster":
            out.append((where, kind, spec))
        elif kind == "RayJob":
            out.append((where, kind, spec.get("rayClusterSpec") or {}))
        elif kind == "RayCronJob":
            job = spec.get("jobTemplate") or {}
            out.append((where, kind, job.get("rayClusterSpec") or {}))
    return out


RAY_SPECS = _ray_cluster_specs()
RAY_JOBS = [(w, d) for w, d in MANIFESTS if d.get("kind") == "RayJob"]
SPEC_PARAMS = [pytest.param(w, k, s, id=f"{k}@{w}") for w, k, s in RAY_SPECS]
JOB_PARAMS = [pytest.param(w, d, id=w) for w, d in RAY_JOBS]


def _containers(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    head = cluster_spec.get("headGroupSpec") or {}
    for c in head.get("template", {}).get("spec", {}).get("containers", []):
        yield "head", c
    for group in cluster_spec.get("workerGroupSpecs") or []:
        for c in group.get("template", {}).get("spec", {}).get("containers", []):
            yield group.get("groupName", "?"), c


def _walk(node: Any) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _gpus(container: dict) -> int:
    res = container.get("resources") or {}
    return int((res.get("limits") or {}).get("nvidia.com/gpu", 0))


# --------------------------------------------------------------------------
# Parsing


def test_expected_files_present():
    for name in (
        "raycluster.yaml",
        "rayjob-train.yaml",
        "rayjob-score.yaml",
        "nightly-score-cronjob.yaml",
        "ray-cluster-aws.yaml",
        "submit.sh",
    ):
        assert (CLUSTER / name).is_file(), name
    assert OPS_DOC.is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_yaml_parses(path: Path):
    docs = _load(path)
    assert docs, f"{path.name} has no YAML documents"
    assert all(isinstance(d, dict) for d in docs)


def test_there_are_ray_resources_to_check():
    kinds = {kind for _, kind, _ in RAY_SPECS}
    assert {"RayCluster", "RayJob"} <= kinds
    # train, score and the nightly template
    assert len(RAY_JOBS) >= 3


# --------------------------------------------------------------------------
# Token authentication


@pytest.mark.parametrize("where,kind,spec", SPEC_PARAMS)
def test_token_auth_enabled(where: str, kind: str, spec: dict):
    assert (spec.get("authOptions") or {}).get("mode") == "token", where
    # KubeRay only accepts authOptions with an explicit rayVersion >= 2.52.0.
    assert spec.get("rayVersion") == RAY_VERSION, where


def test_launcher_token_auth_and_loopback_dashboard():
    cfg = yaml.safe_load(LAUNCHER.read_text())
    head_cmds = " ".join(cfg["head_start_ray_commands"])
    worker_cmds = " ".join(cfg["worker_start_ray_commands"])
    for cmds in (head_cmds, worker_cmds):
        assert "RAY_AUTH_MODE=token" in cmds
        assert "RAY_AUTH_TOKEN_PATH=" in cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    # The same token file reaches every node.
    assert any(remote.endswith("/.ray/auth_token") for remote in cfg["file_mounts"])


def test_launcher_matches_ray_schema():
    spec = importlib.util.find_spec("ray")
    if spec is None or spec.origin is None:
        pytest.skip("ray not installed")
    jsonschema = pytest.importorskip("jsonschema")
    schema_path = Path(spec.origin).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip("ray autoscaler schema not found")
    jsonschema.validate(yaml.safe_load(LAUNCHER.read_text()), json.loads(schema_path.read_text()))


# --------------------------------------------------------------------------
# Dashboard exposure


def test_no_dashboard_on_all_interfaces_anywhere():
    offenders = []
    for path in [*sorted(p for p in CLUSTER.rglob("*") if p.is_file()), OPS_DOC]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "dashboard" in line.lower() and ("0.0.0.0" in line or re.search(r"host[=: ]+['\"]?::", line)):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("where,kind,spec", SPEC_PARAMS)
def test_head_not_exposed(where: str, kind: str, spec: dict):
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", where
    assert not head.get("enableIngress", False), where
    host = (head.get("rayStartParams") or {}).get("dashboard-host")
    assert host not in {"0.0.0.0", "::"}, where
    if kind == "RayCluster":
        # Long-lived cluster: loopback only, reached via kubectl port-forward.
        assert host == "127.0.0.1", where


def test_no_externally_exposing_objects():
    for where, doc in MANIFESTS:
        assert doc["kind"] not in {"Ingress", "Route", "Gateway", "HTTPRoute"}, where
        if doc["kind"] == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", where


# --------------------------------------------------------------------------
# Secrets


def test_aws_env_only_from_secret_refs():
    seen = 0
    for where, doc in MANIFESTS:
        for node in _walk(doc):
            envs = node.get("env")
            for env in envs if isinstance(envs, list) else []:
                name = env.get("name", "")
                if not name.startswith("AWS_"):
                    continue
                seen += 1
                assert "value" not in env, f"{where}: literal value for {name}"
                ref = (env.get("valueFrom") or {}).get("secretKeyRef") or {}
                assert ref.get("name") == S3_SECRET, f"{where}: {name} not from {S3_SECRET}"
                assert ref.get("key") == name, where
            assert "envFrom" not in node or all("configMapRef" not in e for e in node["envFrom"]), (
                f"{where}: env from a ConfigMap"
            )
    assert seen > 0


@pytest.mark.parametrize("where,kind,spec", SPEC_PARAMS)
def test_every_ray_container_gets_s3_env(where: str, kind: str, spec: dict):
    for group, container in _containers(spec):
        names = {e["name"] for e in container.get("env") or []}
        missing = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"} - names
        assert not missing, f"{where} {group}: missing {missing}"


def test_no_secret_material_in_files():
    patterns = [
        re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id shape
        re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
        # KEY=literal / KEY: literal (allow $VAR / ${VAR} / "$VAR" references)
        re.compile(
            r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|RAY_AUTH_TOKEN)\s*[=:]\s*[\"']?(?![\"'$<{])[A-Za-z0-9/+=]{12,}"
        ),
    ]
    offenders = []
    for path in [*sorted(p for p in CLUSTER.rglob("*") if p.is_file()), OPS_DOC]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in patterns):
                offenders.append(f"{path.relative_to(REPO)}:{n}")
    assert not offenders, offenders
    for where, doc in MANIFESTS:
        assert doc["kind"] != "Secret", f"{where}: Secrets must not be committed"


@pytest.mark.parametrize("where,doc", JOB_PARAMS)
def test_rayjob_runtime_env_has_no_credentials_or_shell_refs(where: str, doc: dict):
    text = doc["spec"].get("runtimeEnvYAML", "")
    # K8sJobMode puts this JSON inside a bash -c "..." in the submitter pod, so
    # `${...}` / `$(...)` would be expanded there (to empty strings).
    assert "$" not in text, where
    env = (yaml.safe_load(text) or {}).get("env_vars") or {}
    assert not [k for k in env if k.startswith("AWS_")], where


# --------------------------------------------------------------------------
# Topology


@pytest.mark.parametrize("where,kind,spec", SPEC_PARAMS)
def test_head_without_gpu_and_gpu_worker_group(where: str, kind: str, spec: dict):
    head = spec["headGroupSpec"]
    for c in head["template"]["spec"]["containers"]:
        assert _gpus(c) == 0, f"{where}: head requests a GPU"
    assert (head.get("rayStartParams") or {}).get("num-gpus") == "0", where
    gpu_groups = [g for g in spec["workerGroupSpecs"] if any(_gpus(c) for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, f"{where}: no GPU worker group"
    for g in gpu_groups:
        assert all(_gpus(c) == 1 for c in g["template"]["spec"]["containers"]), where
    cpu_groups = [g for g in spec["workerGroupSpecs"] if g not in gpu_groups]
    assert cpu_groups, f"{where}: no CPU (decode) worker group"


@pytest.mark.parametrize("where,kind,spec", SPEC_PARAMS)
def test_images_pinned_to_ray_version(where: str, kind: str, spec: dict):
    for group, c in _containers(spec):
        assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), (where, group)


# The values KubeRay v1.7.0 accepts (its CRD leaves submissionMode a free string;
# the operator's Go types define these).
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


@pytest.mark.parametrize("where,doc", JOB_PARAMS)
def test_rayjob_lifecycle(where: str, doc: dict):
    spec = doc["spec"]
    mode = spec.get("submissionMode", "K8sJobMode")
    assert mode in SUBMISSION_MODES - {"InteractiveMode"}, where  # nothing here submits by hand
    if mode != "K8sJobMode":  # no submitter Job: its knobs would only mislead
        assert "submitterPodTemplate" not in spec and "submitterConfig" not in spec, where
    # The cluster goes when the job ends, after a short look at the logs.
    assert spec.get("shutdownAfterJobFinishes") is True, where
    assert 0 < spec.get("ttlSecondsAfterFinished", 0) <= 3600, where
    # Every job has a hard stop (per attempt); KubeRay never retries a DeadlineExceeded.
    assert 0 < spec.get("activeDeadlineSeconds", 0) <= 86400, where
    retries = spec.get("backoffLimit", 0)
    assert 0 <= retries <= 3, where
    if retries and "jobs/score.py" in spec["entrypoint"]:
        # Each retry runs on a fresh cluster: with a fixed run id it continues the run.
        args = spec["entrypoint"].split()
        assert "--run-id" in args and "--replace" not in args, where
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert str(env["working_dir"]).endswith(".zip"), where


SCORING_KNOBS = (
    "submissionMode",
    "shutdownAfterJobFinishes",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "backoffLimit",
)


def _scoring_job_sources() -> list[tuple[str, str]]:
    """(where, YAML text) of the scoring RayJobs: the one-off file and the nightly template."""
    nightly = {d["kind"]: d for d in _load(CLUSTER / "nightly-score-cronjob.yaml")}["ConfigMap"]
    return [
        ("rayjob-score.yaml", (CLUSTER / "rayjob-score.yaml").read_text()),
        ("nightly-score-cronjob.yaml:rayjob.yaml", nightly["data"]["rayjob.yaml"]),
    ]


@pytest.mark.parametrize("where,text", [pytest.param(w, t, id=w) for w, t in _scoring_job_sources()])
def test_scoring_rayjob_knobs_chosen_and_explained(where: str, text: str):
    """HTTPMode (no submitter pod whose eviction fails a healthy job), retries that resume
    (same --run-id), a per-attempt deadline, cluster deleted after a short TTL; and each
    knob carries its one-line reason as a YAML comment (on its line or the line above)."""
    job = next(
        d
        for d in yaml.safe_load_all(text.replace(RUN_DATE_PLACEHOLDER, "2000-01-31"))
        if d and d.get("kind") == "RayJob"
    )
    spec = job["spec"]
    assert spec["submissionMode"] == "HTTPMode", where
    assert spec["backoffLimit"] >= 1, where
    assert "--run-id" in spec["entrypoint"].split(), where
    lines = text.splitlines()
    for knob in SCORING_KNOBS:
        (n,) = [i for i, line in enumerate(lines) if re.match(rf"\s*{knob}:", line)]
        reason = "#" in lines[n] or lines[n - 1].strip().startswith("#")
        assert reason, f"{where}: `{knob}` has no one-line reason (a YAML comment)"


def _project_deps_without_ray() -> list[str]:
    pyproject = REPO / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("no pyproject.toml")
    import tomllib

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if re.match(r"[A-Za-z0-9._-]+", d).group(0).lower() != "ray"]


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


# The extras cluster nodes never need: the demo's local S3 endpoint and the report's plots.
NOT_ON_CLUSTER = {"moto", "matplotlib"}


@pytest.mark.parametrize("where,doc", JOB_PARAMS)
def test_rayjob_pip_matches_pyproject(where: str, doc: dict):
    # The stock image provides ray; every other core dependency must be installed
    # per job, with the same pin, and nothing from the extras.
    env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
    packages = env["pip"]["packages"]
    core = _project_deps_without_ray()
    missing = [d for d in core if d not in packages]
    assert not missing, f"{where}: runtimeEnvYAML.pip lacks pyproject core dependencies {missing}"
    extra = [p for p in packages if p not in core]
    assert not extra, f"{where}: runtimeEnvYAML.pip has {extra}, not pyproject core dependencies"
    assert not {_name(p) for p in packages} & NOT_ON_CLUSTER, f"{where}: moto/matplotlib on the cluster"


def test_cluster_only_extras_stay_out_of_core():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not {_name(d) for d in project["dependencies"]} & NOT_ON_CLUSTER
    extras = project["optional-dependencies"]
    assert [_name(d) for d in extras["local"]] == ["moto"]
    assert [_name(d) for d in extras["report"]] == ["matplotlib"]
    # `make demo` / `make test` install .[dev]: it must bring both.
    assert "dragons[local,report]" in extras["dev"]
    assert "'.[dev]'" in (REPO / "Makefile").read_text()


# --------------------------------------------------------------------------
# Entrypoints -> job scripts


def _entrypoint_scripts() -> list[tuple[str, str]]:
    out = []
    for where, doc in MANIFESTS:
        if doc.get("kind") == "RayJob":
            for script in re.findall(r"python\s+(\S+\.py)", doc["spec"]["entrypoint"]):
                out.append((where, script))
    return out


def test_entrypoints_reference_job_scripts():
    scripts = _entrypoint_scripts()
    assert {s for _, s in scripts} == {"jobs/train.py", "jobs/score.py"}


@pytest.mark.parametrize("script", ["jobs/train.py", "jobs/score.py"])
def test_job_scripts_exist(script: str):
    assert (REPO / script).is_file(), f"{script} is referenced by cluster/ but missing"


def test_entrypoint_arguments():
    by_kind = {}
    for where, doc in RAY_JOBS:
        by_kind.setdefault(doc["metadata"]["labels"]["app.kubernetes.io/component"], []).append(
            doc["spec"]["entrypoint"]
        )
    (train,) = by_kind["train"]
    for flag in ("--data", "--out", "--storage"):
        assert flag in train
    (score,) = by_kind["score"]
    for flag in ("--model", "--input", "--output"):
        assert flag in score
    (nightly,) = by_kind["nightly-score"]
    assert "--run-id 2000-01-31" in nightly  # rendered from __RUN_DATE__
    # The morning report lands beside the table, one folder per night.
    assert re.search(r"--report s3://\S+-reports/2000-01-31(\s|$)", nightly), nightly


# --------------------------------------------------------------------------
# Nightly schedule


def test_nightly_cronjob():
    docs = {d["kind"]: d for d in _load(CLUSTER / "nightly-score-cronjob.yaml")}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron.get("timeZone") == "Etc/UTC"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    # The run date is computed in UTC, matching the schedule's time zone.
    assert "date -u +%Y-%m-%d" in " ".join(pod["initContainers"][0]["command"])
    template = docs["ConfigMap"]["data"]["rayjob.yaml"]
    assert f"name: dragons-nightly-{RUN_DATE_PLACEHOLDER}" in template
    assert f"--run-id {RUN_DATE_PLACEHOLDER}" in template
    # Least privilege: only RayJobs, only create/get.
    (rule,) = docs["Role"]["rules"]
    assert rule["resources"] == ["rayjobs"] and set(rule["verbs"]) <= {"create", "get"}


def test_nightly_runs_never_overlap():
    """One RayJob per UTC date (its name, its run id); the CronJob forbids a second
    concurrent run, waits at most an hour for the previous night and then skips; the
    waiter outlives all attempts of its RayJob and ends well before the next night."""
    docs = {d["kind"]: d for d in _load(CLUSTER / "nightly-score-cronjob.yaml")}
    cron = docs["CronJob"]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["schedule"].split()[2:] == ["*", "*", "*"], "once a day"
    assert 0 < cron["startingDeadlineSeconds"] <= 3600
    (job,) = [d for w, d in RAY_JOBS if d["metadata"]["labels"]["app.kubernetes.io/component"] == "nightly-score"]
    assert job["metadata"]["name"] == "dragons-nightly-2000-01-31"
    assert job["metadata"]["labels"]["dragons/run-id"] == "2000-01-31"
    spec = job["spec"]
    args = spec["entrypoint"].split()
    assert args[args.index("--run-id") + 1] == "2000-01-31" and "--replace" not in args
    attempts = spec["backoffLimit"] + 1  # each attempt has its own activeDeadlineSeconds
    waiter = cron["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert attempts * spec["activeDeadlineSeconds"] < waiter < 24 * 3600 - cron["startingDeadlineSeconds"]


# --------------------------------------------------------------------------
# NetworkPolicies: every Ray pod fenced

METRICS_PORT, DASHBOARD_PORT = 8080, 8265
MONITORING_PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
OPERATOR_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}},
}
ALL_BUT_METRICS = set(range(1, 65536)) - {METRICS_PORT}


def _ray_pods(where: str, doc: dict) -> list[tuple[str, dict[str, str], list[dict]]]:
    """(group, labels the pod will carry, containers) for each Ray pod template of a
    RayCluster / RayJob: the template's labels plus those KubeRay adds. A RayJob's
    cluster name is generated, so its pods get no predictable ray.io/cluster here."""
    spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
    auto = {"ray.io/cluster": doc["metadata"]["name"]} if doc["kind"] == "RayCluster" else {}
    groups = [("head", "headgroup", spec["headGroupSpec"])]
    groups += [(g["groupName"], g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
    out = []
    for name, group, g in groups:
        node_type = "head" if name == "head" else "worker"
        labels = {
            **(g["template"].get("metadata") or {}).get("labels", {}),
            **auto,
            "ray.io/node-type": node_type,
            "ray.io/group": group,
        }
        out.append((name, labels, g["template"]["spec"]["containers"]))
    return out


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if not (selector.get("matchLabels") or {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {
            "In": labels.get(key) in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _ports(rule: dict) -> set[int]:
    """The TCP ports an ingress rule admits (no `ports`: all of them)."""
    if not rule.get("ports"):
        return set(range(1, 65536))
    out: set[int] = set()
    for p in rule["ports"]:
        assert p.get("protocol", "TCP") == "TCP", p
        assert isinstance(p["port"], int), f"use port numbers, not names: {p}"
        out |= set(range(p["port"], p.get("endPort", p["port"]) + 1))
    return out


def _files_with_ray_pods() -> list[str]:
    return sorted({w.split(":")[0] for w, d in MANIFESTS if d["kind"] in {"RayCluster", "RayJob"}})


def _in_file(name: str, kind: str) -> list[dict]:
    return [d for w, d in MANIFESTS if w.split(":")[0] == name and d["kind"] == kind]


def test_every_config_with_ray_pods_is_checked():
    assert _files_with_ray_pods() == [
        "nightly-score-cronjob.yaml",
        "raycluster.yaml",
        "rayjob-score.yaml",
        "rayjob-train.yaml",
    ]


@pytest.mark.parametrize("name", _files_with_ray_pods())
def test_every_ray_pod_is_fenced_by_a_network_policy(name: str):
    """Each Ray pod (head and every worker group) is selected by an Ingress policy of the
    same file, which admits: the cluster's own pods on every port but the metrics port;
    the monitoring namespace on the metrics port only; on the head's 8265 the operator and,
    in K8sJobMode, the job's submitter pod. Nothing else."""
    policies = [p for p in _in_file(name, "NetworkPolicy") if "Ingress" in p["spec"].get("policyTypes", [])]
    objects = _in_file(name, "RayCluster") + _in_file(name, "RayJob")
    assert objects and policies, name
    for obj in objects:
        submitter = None
        if obj["kind"] == "RayJob" and obj["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode":
            submitter = {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": obj["metadata"]["name"]}}}
        for group, labels, containers in _ray_pods(name, obj):
            where = f"{name}: {obj['kind']} {obj['metadata']['name']} {group}"
            for c in containers:  # the policies' metrics port is the pods' metrics port
                assert {"containerPort": METRICS_PORT, "name": "metrics"} in (c.get("ports") or []), where
            rules = [
                r for p in policies if _selects(p["spec"]["podSelector"], labels) for r in p["spec"].get("ingress", [])
            ]
            assert rules, f"{where}: no NetworkPolicy selects this Ray pod"
            own = [r for r in rules if len(r.get("from") or []) == 1 and set(r["from"][0]) == {"podSelector"}]
            assert len(own) == 1, f"{where}: expected one rule for the cluster's own pods"
            own_selector = own[0]["from"][0]["podSelector"]
            assert _selects(own_selector, labels) and "ray.io/node-type" not in own_selector.get("matchLabels", {}), (
                where
            )
            assert _ports(own[0]) == ALL_BUT_METRICS, f"{where}: own pods must reach every port but {METRICS_PORT}"
            admitted: dict[int, list] = {}
            for r in rules:
                for port in (METRICS_PORT, DASHBOARD_PORT):
                    if port in _ports(r):
                        admitted.setdefault(port, []).extend(r["from"])
            assert admitted[METRICS_PORT] == [MONITORING_PEER], (
                f"{where}: metrics port open to {admitted[METRICS_PORT]}"
            )
            expected = [own[0]["from"][0]]
            if group == "head":
                expected += [OPERATOR_PEER] + ([submitter] if submitter else [])
            assert sorted(map(repr, admitted[DASHBOARD_PORT])) == sorted(map(repr, expected)), where


def test_network_policies_admit_no_one_else():
    """No rule admits the world: no empty or missing `from`, no ipBlock, no bare
    namespaceSelector but the monitoring namespace's (metrics port only); the operator
    and submitter peers only reach the dashboard port."""
    seen = 0
    for where, doc in MANIFESTS:
        if doc["kind"] != "NetworkPolicy":
            continue
        spec = doc["spec"]
        assert spec["podSelector"].get("matchLabels"), f"{where}: selects every pod of the namespace"
        assert "egress" not in spec and spec["policyTypes"] == ["Ingress"], where
        for rule in spec["ingress"]:
            seen += 1
            peers = rule.get("from")
            assert peers, f"{where}: an ingress rule without `from` admits everyone"
            for peer in peers:
                assert "ipBlock" not in peer, f"{where}: {peer}"
                if peer == MONITORING_PEER:
                    assert _ports(rule) == {METRICS_PORT}, where
                elif peer == OPERATOR_PEER or "batch.kubernetes.io/job-name" in peer.get("podSelector", {}).get(
                    "matchLabels", {}
                ):
                    assert _ports(rule) == {DASHBOARD_PORT}, where
                else:  # the cluster's own pods, by a label only Ray pods of this config carry
                    assert set(peer) == {"podSelector"}, f"{where}: {peer}"
                    keys = set(peer["podSelector"].get("matchLabels") or {})
                    assert keys & {"ray.io/cluster", "dragons/ray-job", "dragons/nightly-ray"}, f"{where}: {peer}"
    assert seen


# --------------------------------------------------------------------------
# submit.sh


def test_submit_sh_syntax_and_strict_mode():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not available")
    subprocess.run([bash, "-n", str(SUBMIT)], check=True)
    text = SUBMIT.read_text()
    assert "set -euo pipefail" in text
    assert not re.search(r"^\s*set\s+-\w*x", text, re.M), "xtrace would print secrets"
    assert SUBMIT.stat().st_mode & stat.S_IXUSR, "submit.sh must be executable"


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A copy of submit.sh in a fake repo with stub job scripts and a stub
    `ray` that records its argv and RAY_AUTH_MODE."""
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    (tmp_path / "cluster").mkdir()
    shutil.copy2(SUBMIT, tmp_path / "cluster" / "submit.sh")
    (tmp_path / "jobs").mkdir()
    for name in ("train.py", "score.py"):
        (tmp_path / "jobs" / name).write_text("")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["torch==2.14.1", '
        '"ray[data,train,default]==2.58.1", "pillow>=10"]\n'
        # Extras never reach the cluster's runtime_env.
        '[project.optional-dependencies]\nlocal = ["moto[server]>=5.0"]\nreport = ["matplotlib>=3.8"]\n'
    )
    bindir = tmp_path / "bin"
    bindir.mkdir()
    stub = bindir / "ray"
    stub.write_text(
        '#!/usr/bin/env bash\nprintf "%s\\0" "$@" > "$STUB_ARGS"\nprintf "%s" "${RAY_AUTH_MODE:-}" > "$STUB_MODE"\n'
    )
    stub.chmod(0o755)
    (tmp_path / "home").mkdir()
    return tmp_path


def _run_submit(sandbox: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {
        "PATH": f"{sandbox / 'bin'}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(sandbox / "home"),
        "STUB_ARGS": str(sandbox / "args"),
        "STUB_MODE": str(sandbox / "mode"),
        "PYTHON": sys.executable,
    }
    base.update(env)
    return subprocess.run(
        ["bash", str(sandbox / "cluster" / "submit.sh"), *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_submit_sh_builds_ray_job_submit(sandbox: Path):
    secret = "sentinel-SECRET-value-0123456789"
    proc = _run_submit(
        sandbox,
        "score",
        "--model",
        "s3://b/models/m",
        "--input",
        "s3://b/images/p q",
        "--output",
        "s3://b/tables/scores",
        RAY_AUTH_TOKEN="sentinel-TOKEN-value-0123456789",
        AWS_SECRET_ACCESS_KEY=secret,
        AWS_ACCESS_KEY_ID="sentinel-KEYID",
        AWS_REGION="us-east-1",
        AWS_ENDPOINT_URL="",  # how env files write "not set": real AWS S3
    )
    assert proc.returncode == 0, proc.stderr
    argv = (sandbox / "args").read_text().split("\0")[:-1]
    sep = argv.index("--")
    head, tail = argv[:sep], argv[sep + 1 :]
    assert head[:2] == ["job", "submit"]
    assert head[head.index("--address") + 1] == "http://127.0.0.1:8265"
    assert head[head.index("--working-dir") + 1] == "."
    assert tail == [
        "python",
        "jobs/score.py",
        "--model",
        "s3://b/models/m",
        "--input",
        "s3://b/images/p q",
        "--output",
        "s3://b/tables/scores",
    ]
    runtime_env = json.loads(head[head.index("--runtime-env-json") + 1])
    env_vars = runtime_env["env_vars"]
    # Set here: sent by name. Empty here: left out, so no node gets AWS_ENDPOINT_URL="".
    assert set(env_vars) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
    }
    # Only name references, resolved by Ray on the cluster nodes.
    assert all(v == "${" + k + "}" for k, v in env_vars.items())
    assert ".venv/" in runtime_env["excludes"]
    assert "pip" not in runtime_env
    assert (sandbox / "mode").read_text() == "token"
    everything = proc.stdout + proc.stderr + "\0".join(argv)
    assert secret not in everything and "sentinel-TOKEN" not in everything
    assert "sentinel-KEYID" not in everything


def test_submit_sh_leaves_out_unset_and_empty_aws_vars(sandbox: Path):
    """Ray expands a `${NAME}` that a node lacks to "": an AWS_ENDPOINT_URL that is
    empty or unset where the job is submitted must not reach the job's env_vars."""
    proc = _run_submit(sandbox, "score", RAY_AUTH_TOKEN="x", AWS_ENDPOINT_URL="", AWS_REGION="  ")
    assert proc.returncode == 0, proc.stderr
    argv = (sandbox / "args").read_text().split("\0")[:-1]
    assert json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"] == {}
    proc = _run_submit(sandbox, "score", RAY_AUTH_TOKEN="x", AWS_ENDPOINT_URL="http://minio:9000")
    argv = (sandbox / "args").read_text().split("\0")[:-1]
    env_vars = json.loads(argv[argv.index("--runtime-env-json") + 1])["env_vars"]
    assert env_vars == {"AWS_ENDPOINT_URL": "${AWS_ENDPOINT_URL}"}


def test_submit_sh_train_address_and_pip(sandbox: Path):
    proc = _run_submit(
        sandbox,
        "train",
        "--data",
        "s3://b/d",
        RAY_AUTH_TOKEN="x",
        RAY_ADDRESS="http://127.0.0.1:18265",
        DRAGONS_RUNTIME_PIP="1",
    )
    assert proc.returncode == 0, proc.stderr
    argv = (sandbox / "args").read_text().split("\0")[:-1]
    assert argv[argv.index("--address") + 1] == "http://127.0.0.1:18265"
    assert argv[argv.index("--") + 1 :][:2] == ["python", "jobs/train.py"]
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    # pyproject core dependencies minus ray (the cluster image provides it), no extras.
    assert runtime_env["pip"]["packages"] == ["torch==2.14.1", "pillow>=10"]


def test_submit_sh_requires_token(sandbox: Path):
    proc = _run_submit(sandbox, "score", "--model", "m")
    assert proc.returncode != 0
    assert not (sandbox / "args").exists(), "ray must not run without a token"
    (sandbox / "home" / ".ray").mkdir()
    (sandbox / "home" / ".ray" / "auth_token").write_text("tok")
    assert _run_submit(sandbox, "score").returncode == 0


def test_submit_sh_rejects_unknown_job(sandbox: Path):
    proc = _run_submit(sandbox, "query", RAY_AUTH_TOKEN="x")
    assert proc.returncode == 2
    assert not (sandbox / "args").exists()
