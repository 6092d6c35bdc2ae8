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


# Files whose RayJob heads serve the dashboard on the pod network (KubeRay's
# default with dashboard-host unset: the submitter pod and the operator need it).
RAYJOB_FILES = sorted(CLUSTER.glob("rayjob-*.yaml"))


@pytest.mark.parametrize("path", RAYJOB_FILES, ids=lambda p: p.name)
def test_rayjob_dashboard_fenced_by_network_policy(path: Path):
    """Unset dashboard-host means 0.0.0.0 in the head pod: then the same file must ship a
    NetworkPolicy that admits to 8265 only this job's submitter pod and the KubeRay operator."""
    docs = _load(path)
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, path
    job = jobs[0]
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    host = (spec["rayClusterSpec"]["headGroupSpec"].get("rayStartParams") or {}).get("dashboard-host")
    if host == "127.0.0.1":  # loopback: only a submitter inside the head pod could reach it
        assert spec.get("submissionMode") == "SidecarMode", path
        return
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    assert policies, f"{path.name}: dashboard on the pod network without a NetworkPolicy"
    heads = [p for p in policies if (p["spec"]["podSelector"].get("matchLabels") or {}).get("ray.io/node-type") == "head"]
    assert len(heads) == 1, path
    pol = heads[0]["spec"]
    assert pol["podSelector"]["matchLabels"]["ray.io/originated-from-cr-name"] == name
    assert "Ingress" in pol["policyTypes"]
    dashboard_rules, other_rules = [], []
    for rule in pol["ingress"]:
        ports = {p["port"] for p in rule.get("ports") or []}
        assert rule.get("from"), f"{path.name}: an ingress rule without `from` admits everyone"
        (dashboard_rules if 8265 in ports else other_rules).append(rule)
        assert not ports or ports == {8265}, ports
    # 8265: only the submitter (the Job named after the RayJob) and the operator.
    assert len(dashboard_rules) == 1
    peers = dashboard_rules[0]["from"]
    assert {"batch.kubernetes.io/job-name": name} in [p.get("podSelector", {}).get("matchLabels") for p in peers]
    operator = [p for p in peers if p.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "kuberay-operator"}]
    assert len(operator) == 1 and len(peers) == 2, peers
    for p in peers:
        assert "ipBlock" not in p
    # Any other rule admits only this job's own Ray pods (they need the GCS).
    for rule in other_rules:
        assert rule["from"] == [{"podSelector": {"matchLabels": {"ray.io/originated-from-cr-name": name}}}], rule


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
            assert "envFrom" not in node or all(
                "configMapRef" not in e for e in node["envFrom"]
            ), f"{where}: env from a ConfigMap"
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
    gpu_groups = [
        g
        for g in spec["workerGroupSpecs"]
        if any(_gpus(c) for c in g["template"]["spec"]["containers"])
    ]
    assert gpu_groups, f"{where}: no GPU worker group"
    for g in gpu_groups:
        assert all(_gpus(c) == 1 for c in g["template"]["spec"]["containers"]), where
    cpu_groups = [g for g in spec["workerGroupSpecs"] if g not in gpu_groups]
    assert cpu_groups, f"{where}: no CPU (decode) worker group"


@pytest.mark.parametrize("where,kind,spec", SPEC_PARAMS)
def test_images_pinned_to_ray_version(where: str, kind: str, spec: dict):
    for group, c in _containers(spec):
        assert c["image"].startswith(f"rayproject/ray:{RAY_VERSION}-"), (where, group)


@pytest.mark.parametrize("where,doc", JOB_PARAMS)
def test_rayjob_lifecycle(where: str, doc: dict):
    spec = doc["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, where
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", where
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert str(env["working_dir"]).endswith(".zip"), where


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


def test_nightly_dashboard_fenced_by_network_policy():
    """Each night's RayJob has a new name, so its pods are fenced by fixed labels: the
    head's 8265 admits only the submitter pod and the operator, other head ports only
    the night's own Ray pods; every Ray pod of the template carries the label."""
    docs = _load(CLUSTER / "nightly-score-cronjob.yaml")
    (job,) = [d for w, d in RAY_JOBS if d["metadata"]["labels"]["app.kubernetes.io/component"] == "nightly-score"]
    spec = job["spec"]
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    ray_label = {"dragons/nightly-ray": "true"}
    groups = [spec["rayClusterSpec"]["headGroupSpec"]] + spec["rayClusterSpec"]["workerGroupSpecs"]
    for g in groups:
        assert g["template"]["metadata"]["labels"].items() >= ray_label.items(), g.get("groupName", "head")
    submitter = spec["submitterPodTemplate"]["metadata"]["labels"]
    (pol,) = [d["spec"] for d in docs if d.get("kind") == "NetworkPolicy"]
    assert pol["podSelector"]["matchLabels"] == {**ray_label, "ray.io/node-type": "head"}
    assert pol["policyTypes"] == ["Ingress"]
    dashboard = [r for r in pol["ingress"] if {p["port"] for p in r.get("ports") or []} == {8265}]
    others = [r for r in pol["ingress"] if r not in dashboard]
    assert len(dashboard) == 1 and len(others) == 1
    peers = [p.get("podSelector", {}).get("matchLabels") for p in dashboard[0]["from"]]
    assert peers == [submitter, {"app.kubernetes.io/name": "kuberay-operator"}]
    assert others[0]["from"] == [{"podSelector": {"matchLabels": ray_label}}] and not others[0].get("ports")


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
        "#!/usr/bin/env bash\n"
        'printf "%s\\0" "$@" > "$STUB_ARGS"\n'
        'printf "%s" "${RAY_AUTH_MODE:-}" > "$STUB_MODE"\n'
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
