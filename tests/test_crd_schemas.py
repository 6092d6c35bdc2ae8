"""Strict schema checks for every Kubernetes object under cluster/.

* KubeRay objects (RayCluster, RayJob, RayCronJob), including RayJob manifests
  embedded as text in ConfigMaps (the nightly template, rendered with a sample
  date), are validated against the `openAPIV3Schema` of the matching version in
  KubeRay v1.7.0's CRDs (../shared/reference/kuberay-crds/).
* Unknown fields are errors, as with `kubectl apply --validate=strict`: every
  object schema that lists `properties` and neither sets `additionalProperties`
  nor `x-kubernetes-preserve-unknown-fields: true` gets `additionalProperties:
  false` in a transformed copy. `x-kubernetes-int-or-string` accepts an int or a
  string; `nullable` adds null.
* Plain Kubernetes objects (ServiceAccount, ConfigMap, Secret, Role, RoleBinding,
  NetworkPolicy, CronJob) are checked against small hand-made strict schemas:
  the fields these files use plus their documented siblings. Pod templates,
  label selectors and NetworkPolicy rules reuse the core/v1 and networking/v1
  schemas that the KubeRay CRDs embed (generated from k8s.io/api).

Not checked: CEL rules (`x-kubernetes-validations`), `format`, and the
operator's own webhook-free validation (utils/validation.go in KubeRay); the
knobs that matter are asserted in tests/test_cluster_configs.py.

The CRD files are required: a missing file fails these tests, never skips them.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator  # ships with ray (a core dependency)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = REPO.parent / "shared" / "reference" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
LAUNCHER = CLUSTER / "ray-cluster-aws.yaml"  # Ray cluster launcher config: not a Kubernetes object
PLACEHOLDERS = {"__RUN_DATE__": "2000-01-31"}  # substituted in embedded manifests before validating
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------
# Objects under cluster/


def _objects() -> Iterator[tuple[str, dict]]:
    """(where, object) for every Kubernetes object in cluster/, plus the manifests
    embedded in ConfigMaps (`*.yaml` keys), placeholders substituted."""
    for path in sorted(CLUSTER.glob("*.y*ml")):
        if path == LAUNCHER:
            continue
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if not isinstance(doc, dict):
                continue
            yield f"{path.name}#{i}:{doc.get('kind')}", doc
            if doc.get("kind") != "ConfigMap":
                continue
            for key, text in (doc.get("data") or {}).items():
                if not key.endswith((".yaml", ".yml")):
                    continue
                for old, new in PLACEHOLDERS.items():
                    text = text.replace(old, new)
                left = re.findall(r"__[A-Z][A-Z0-9_]*__", text)
                assert not left, f"{path.name}:{key}: unknown placeholder(s) {left}: add them to PLACEHOLDERS"
                for j, sub in enumerate(yaml.safe_load_all(text)):
                    if isinstance(sub, dict):
                        yield f"{path.name}:{key}#{j}:{sub.get('kind')}", sub


OBJECTS = list(_objects())
RAY_OBJECTS = [(w, d) for w, d in OBJECTS if str(d.get("apiVersion", "")).startswith("ray.io/")]
PLAIN_OBJECTS = [(w, d) for w, d in OBJECTS if (w, d) not in RAY_OBJECTS]


# --------------------------------------------------------------------------
# CRD schemas, made strict


def strictify(schema: Any) -> Any:
    """A copy of an OpenAPI v3 (structural) schema that rejects unknown fields and
    understands the Kubernetes extensions jsonschema does not know."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in {"properties", "patternProperties", "definitions"}:
            out[key] = {name: strictify(sub) for name, sub in value.items()}
        elif key in {"items", "additionalProperties", "not"}:
            out[key] = [strictify(s) for s in value] if isinstance(value, list) else strictify(value)
        elif key in {"anyOf", "allOf", "oneOf"}:
            out[key] = [strictify(s) for s in value]
        else:
            out[key] = value  # leaves: type, enum, default, required, format, x-kubernetes-*, ...
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    if out.get("x-kubernetes-embedded-resource") and "properties" in out:
        for name in ("apiVersion", "kind"):
            out["properties"].setdefault(name, {"type": "string"})
        out["properties"].setdefault("metadata", {"type": "object"})
    if "properties" in out and not preserve and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _fail_without_crds() -> None:
    missing = [f for f in CRD_FILES.values() if not (CRD_DIR / f).is_file()]
    if missing:
        pytest.fail(
            f"KubeRay v1.7.0 CRD file(s) {missing} not found in {CRD_DIR} "
            "(expected at ../shared/reference/kuberay-crds relative to the repository root); "
            "the strict schema checks cannot run without them",
            pytrace=False,
        )


@functools.cache
def _crd(kind: str) -> dict:
    _fail_without_crds()
    crd = yaml.load((CRD_DIR / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    return crd


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    """The strict openAPIV3Schema of ray.io/<version> <kind>, with metadata checked
    as a (strict) ObjectMeta, as the API server does for every object."""
    crd = _crd(kind)
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        pytest.fail(f"{kind}: the KubeRay v1.7.0 CRD serves {sorted(versions)}, not {version}", pytrace=False)
    assert versions[version].get("served", True), f"{kind} {version} is not served"
    schema = strictify(versions[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    return schema


def _sub(kind: str, *path: str) -> dict:
    """A strict sub-schema of the v1 CRD of `kind` (path through `properties`, with
    `[]` for array items)."""
    node = crd_schema(kind, "v1")
    for step in path:
        node = node["items"] if step == "[]" else node["properties"][step]
    return copy.deepcopy(node)


# --------------------------------------------------------------------------
# Hand-made strict schemas for the plain Kubernetes objects

STR: dict = {"type": "string"}
INT: dict = {"type": "integer"}
BOOL: dict = {"type": "boolean"}
STR_MAP: dict = {"type": "object", "additionalProperties": STR}
OPEN: dict = {"type": "object"}  # a documented field these files don't use: type-checked only


def obj(required: tuple[str, ...] = (), **props: Any) -> dict:
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


def arr(items: dict) -> dict:
    return {"type": "array", "items": items}


def enum(*values: str) -> dict:
    return {"type": "string", "enum": list(values)}


OBJECT_META = obj(
    ("name",),
    name=STR,
    generateName=STR,
    namespace=STR,
    labels=STR_MAP,
    annotations=STR_MAP,
    finalizers=arr(STR),
    ownerReferences=arr(OPEN),
)
TEMPLATE_META = obj(labels=STR_MAP, annotations=STR_MAP)


def top(api_version: str, kind: str, required: tuple[str, ...] = (), **fields: Any) -> dict:
    return obj(
        ("apiVersion", "kind", "metadata", *required),
        apiVersion={"const": api_version},
        kind={"const": kind},
        metadata=OBJECT_META,
        **fields,
    )


@functools.cache
def k8s_schemas() -> dict[tuple[str, str], dict]:
    # core/v1 PodTemplateSpec, metav1 LabelSelector and networking/v1 rules, as embedded
    # (and generated from k8s.io/api) in the KubeRay v1.7.0 CRDs.
    pod_template = _sub("RayCluster", "spec", "headGroupSpec", "template")
    head_np = ("spec", "networkPolicy", "head")
    ingress_rule = _sub("RayCluster", *head_np, "ingressRules", "[]")
    egress_rule = _sub("RayCluster", *head_np, "egressRules", "[]")
    label_selector = _sub("RayCluster", *head_np, "ingressRules", "[]", "from", "[]", "podSelector")
    job_spec = obj(
        ("template",),
        template=pod_template,
        activeDeadlineSeconds=INT,
        backoffLimit=INT,
        backoffLimitPerIndex=INT,
        maxFailedIndexes=INT,
        completionMode=enum("NonIndexed", "Indexed"),
        completions=INT,
        parallelism=INT,
        manualSelector=BOOL,
        selector=label_selector,
        suspend=BOOL,
        ttlSecondsAfterFinished=INT,
        podFailurePolicy=OPEN,
        podReplacementPolicy=enum("TerminatingOrFailed", "Failed"),
        successPolicy=OPEN,
        managedBy=STR,
    )
    name_ref = obj(("name",), name=STR)
    return {
        ("v1", "ServiceAccount"): top(
            "v1",
            "ServiceAccount",
            automountServiceAccountToken=BOOL,
            imagePullSecrets=arr(name_ref),
            secrets=arr(OPEN),
        ),
        ("v1", "ConfigMap"): top("v1", "ConfigMap", data=STR_MAP, binaryData=STR_MAP, immutable=BOOL),
        ("v1", "Secret"): top(
            "v1",
            "Secret",
            data=STR_MAP,
            stringData=STR_MAP,
            type=STR,
            immutable=BOOL,
        ),
        ("rbac.authorization.k8s.io/v1", "Role"): top(
            "rbac.authorization.k8s.io/v1",
            "Role",
            rules=arr(
                obj(
                    ("verbs",),
                    apiGroups=arr(STR),
                    resources=arr(STR),
                    resourceNames=arr(STR),
                    verbs=arr(STR),
                    nonResourceURLs=arr(STR),
                )
            ),
        ),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): top(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            ("roleRef",),
            roleRef=obj(("apiGroup", "kind", "name"), apiGroup=STR, kind=enum("Role", "ClusterRole"), name=STR),
            subjects=arr(
                obj(
                    ("kind", "name"),
                    kind=enum("ServiceAccount", "User", "Group"),
                    name=STR,
                    namespace=STR,
                    apiGroup=STR,
                )
            ),
        ),
        ("networking.k8s.io/v1", "NetworkPolicy"): top(
            "networking.k8s.io/v1",
            "NetworkPolicy",
            ("spec",),
            spec=obj(
                ("podSelector",),
                podSelector=label_selector,
                policyTypes=arr(enum("Ingress", "Egress")),
                ingress=arr(ingress_rule),
                egress=arr(egress_rule),
            ),
        ),
        ("batch/v1", "CronJob"): top(
            "batch/v1",
            "CronJob",
            ("spec",),
            spec=obj(
                ("schedule", "jobTemplate"),
                schedule=STR,
                timeZone=STR,
                concurrencyPolicy=enum("Allow", "Forbid", "Replace"),
                startingDeadlineSeconds=INT,
                suspend=BOOL,
                successfulJobsHistoryLimit=INT,
                failedJobsHistoryLimit=INT,
                jobTemplate=obj(("spec",), metadata=TEMPLATE_META, spec=job_spec),
            ),
        ),
    }


# --------------------------------------------------------------------------
# Validation


def schema_for(doc: dict) -> dict:
    api, kind = str(doc.get("apiVersion", "")), str(doc.get("kind", ""))
    if api.startswith("ray.io/"):
        if kind not in CRD_FILES:
            pytest.fail(f"no KubeRay CRD for kind {kind!r}", pytrace=False)
        return crd_schema(kind, api.split("/", 1)[1])
    schemas = k8s_schemas()
    if (api, kind) not in schemas:
        pytest.fail(f"no strict schema for {api} {kind}: add one to tests/test_crd_schemas.py", pytrace=False)
    return schemas[(api, kind)]


def errors(doc: dict) -> list[str]:
    """Every schema violation of `doc`, as 'path: message' lines."""
    validator = Draft7Validator(schema_for(doc))
    out = []
    for err in validator.iter_errors(doc):
        path = ".".join(str(p) for p in err.absolute_path) or "<root>"
        out.append(f"{path}: {err.message}")
    return sorted(out)


def _ids(objects: list[tuple[str, dict]]) -> list:
    return [pytest.param(w, d, id=w) for w, d in objects]


def test_crd_reference_files_present():
    _fail_without_crds()
    for kind in CRD_FILES:
        assert "v1" in {v["name"] for v in _crd(kind)["spec"]["versions"]}, kind


def test_every_object_is_covered():
    kinds = [d.get("kind") for _, d in OBJECTS]
    assert kinds.count("RayCluster") >= 1
    # train, score and the nightly template (embedded in a ConfigMap)
    assert kinds.count("RayJob") >= 3
    assert any(":rayjob.yaml#" in w for w, _ in RAY_OBJECTS), "the nightly RayJob template was not found"
    for kind in ("CronJob", "NetworkPolicy", "Role", "RoleBinding", "ServiceAccount", "ConfigMap"):
        assert kind in kinds, kind


@pytest.mark.parametrize("where,doc", _ids(RAY_OBJECTS))
def test_kuberay_object_matches_crd_schema_strictly(where: str, doc: dict):
    errs = errors(doc)
    assert not errs, f"{where} does not match the KubeRay v1.7.0 CRD:\n" + "\n".join(errs)


@pytest.mark.parametrize("where,doc", _ids(PLAIN_OBJECTS))
def test_kubernetes_object_matches_strict_schema(where: str, doc: dict):
    errs = errors(doc)
    assert not errs, f"{where}:\n" + "\n".join(errs)


# --------------------------------------------------------------------------
# The checks catch what they must


def _first(kind: str, file: str) -> dict:
    for where, doc in OBJECTS:
        if where.startswith(file) and doc.get("kind") == kind:
            return copy.deepcopy(doc)
    raise AssertionError(f"no {kind} in {file}")


def _nightly_rayjob_text() -> str:
    return _first("ConfigMap", "nightly-score-cronjob.yaml")["data"]["rayjob.yaml"]


def _misspell_rayjob(doc: dict) -> dict:
    doc["spec"]["shutdownAfterJobFinishs"] = doc["spec"].pop("shutdownAfterJobFinishes")
    return doc


def _misspell_head(doc: dict) -> dict:
    head = doc["spec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")
    return doc


def _misspell_worker_container(doc: dict) -> dict:
    c = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    c["resource"] = c.pop("resources")
    return doc


def _misspell_embedded(doc: dict) -> dict:
    # The ConfigMap's text, misspelt as a user would: through the rendered manifest.
    text = _nightly_rayjob_text().replace("backoffLimit:", "backofLimit:", 1)
    for old, new in PLACEHOLDERS.items():
        text = text.replace(old, new)
    return yaml.safe_load(text)


def _misspell_cronjob(doc: dict) -> dict:
    doc["spec"]["concurrencyPolicies"] = doc["spec"].pop("concurrencyPolicy")
    return doc


def _misspell_cronjob_pod(doc: dict) -> dict:
    pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["serviceAccount_name"] = pod.pop("serviceAccountName")
    return doc


def _misspell_network_policy(doc: dict) -> dict:
    rule = doc["spec"]["ingress"][0]
    rule["form"] = rule.pop("from")
    return doc


def _misspell_role(doc: dict) -> dict:
    doc["rules"][0]["verb"] = doc["rules"][0].pop("verbs")
    return doc


@pytest.mark.parametrize(
    "file,kind,mutate,field",
    [
        ("rayjob-score.yaml", "RayJob", _misspell_rayjob, "shutdownAfterJobFinishs"),
        ("raycluster.yaml", "RayCluster", _misspell_head, "rayStartParam"),
        ("rayjob-train.yaml", "RayJob", _misspell_worker_container, "resource"),
        ("nightly-score-cronjob.yaml", "ConfigMap", _misspell_embedded, "backofLimit"),
        ("nightly-score-cronjob.yaml", "CronJob", _misspell_cronjob, "concurrencyPolicies"),
        ("nightly-score-cronjob.yaml", "CronJob", _misspell_cronjob_pod, "serviceAccount_name"),
        ("rayjob-score.yaml", "NetworkPolicy", _misspell_network_policy, "form"),
        ("nightly-score-cronjob.yaml", "Role", _misspell_role, "verb"),
    ],
    ids=lambda v: v if isinstance(v, str) else getattr(v, "__name__", str(v)),
)
def test_misspelt_field_fails_and_is_named(file: str, kind: str, mutate, field: str):
    doc = mutate(_first(kind, file))
    errs = errors(doc)
    assert errs, f"a misspelt {field!r} in {file} passed the strict validation"
    assert any(f"'{field}'" in e and "not allowed" in e for e in errs), errs


def test_wrong_types_fail():
    doc = _first("RayCluster", "raycluster.yaml")
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"
    doc["spec"]["authOptions"]["mode"] = "Token"  # enum: disabled | token
    errs = errors(doc)
    assert any(e.startswith("spec.workerGroupSpecs.0.replicas:") for e in errs), errs
    assert any(".ports.0.containerPort:" in e for e in errs), errs
    assert any(e.startswith("spec.authOptions.mode:") for e in errs), errs
    policy = _first("NetworkPolicy", "raycluster.yaml")
    policy["spec"]["ingress"][0]["ports"][0]["port"] = [8265]  # int-or-string only
    policy["spec"]["policyTypes"] = ["ingress"]
    errs = errors(policy)
    assert any(".ports.0.port:" in e for e in errs) and any("policyTypes.0" in e for e in errs), errs


def test_strictify_semantics():
    schema = strictify(
        {
            "type": "object",
            "properties": {
                "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": STR}},
                "map": {"type": "object", "additionalProperties": STR},
                "any": {"type": "object"},
                "port": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
                "qty": {"x-kubernetes-int-or-string": True},
                "maybe": {"type": "string", "nullable": True},
                "list": {"type": "array", "items": {"type": "object", "properties": {"b": INT}}},
            },
        }
    )
    ok = Draft7Validator(schema)
    assert not list(
        ok.iter_errors(
            {
                "open": {"a": "x", "extra": 1},
                "map": {"k": "v"},
                "any": {"whatever": [1]},
                "port": 8265,
                "qty": "500m",
                "maybe": None,
                "list": [{"b": 1}],
            }
        )
    )
    assert not list(ok.iter_errors({"port": "dashboard", "qty": 2}))
    for bad in ({"extra": 1}, {"list": [{"c": 1}]}, {"port": 1.5}, {"qty": [1]}, {"map": {"k": 1}}):
        assert list(ok.iter_errors(bad)), bad
