"""The house's layers: no import runs back up them, and no import goes in a circle.

Every module of ``dragons`` has a layer here; a module imports only from its own
layer or below (module-level and function-level imports alike: a lazy import
still ties the modules together). A new module must be given a layer, which is
the point: where it sits is decided, not discovered.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAYERS: dict[str, int] = {
    # 0: no dragons imports, or errors only: the vocabulary
    "dragons": 0,
    "dragons.errors": 0,
    "dragons.rowerrors": 0,
    "dragons.rayauth": 0,
    "dragons.dataconfig": 0,
    "dragons.calibration": 0,
    "dragons.metrics": 0,
    "dragons.images": 0,
    "dragons.models": 0,
    "dragons.models.efficientnet_lite": 0,
    "dragons.train": 0,
    "dragons.runlog": 0,
    "dragons.signals": 0,
    "dragons.raycompat": 0,
    "dragons.train.ranks": 0,
    "dragons.train.schedule": 0,
    "dragons.score": 0,
    "dragons.local": 0,
    "dragons.local.synth": 0,
    "dragons.novelty": 0,
    "dragons.telemetry": 0,
    "dragons.htmlkit": 0,
    "dragons.loop": 0,
    # 1: storage and names
    "dragons.storage": 1,
    "dragons.columns": 1,
    # 2: images to tensors, the model registry, reading objects in Ray, what a job asks of the cluster;
    # the labels people gave and the registry's versions (the artifact and the data read them)
    "dragons.loop.labels": 2,
    "dragons.loop.versions": 2,
    "dragons.models.registry": 2,
    "dragons.models.fuse": 2,
    "dragons.preprocess": 2,
    "dragons.decode": 2,
    "dragons.data": 2,
    "dragons.cliargs": 2,
    "dragons.capacity": 2,
    # 3: the artifact, the one inference path, Ray start-up and sizing, reports, the table's layout
    "dragons.artifact": 3,
    "dragons.predictor": 3,
    "dragons.raycluster": 3,
    "dragons.report": 3,
    "dragons.score.schema": 3,
    # 4: each wing's configuration and storage
    "dragons.train.config": 4,
    "dragons.score.config": 4,
    "dragons.score.export": 4,
    "dragons.score.listing": 4,
    "dragons.score.engine": 4,
    "dragons.score.table": 4,
    "dragons.score.inventory": 4,
    # 5: the wings
    "dragons.train.recipe": 5,
    "dragons.train.stream": 5,
    "dragons.train.worker": 5,
    "dragons.train.trainer": 5,
    "dragons.train.checkpoint": 5,
    "dragons.train.plan": 5,
    "dragons.train.loop": 5,
    "dragons.train.run": 5,
    "dragons.score.query": 5,
    "dragons.score.incremental": 5,
    "dragons.score.source": 5,
    "dragons.score.maintenance": 5,
    "dragons.score.pipeline": 5,
    "dragons.score.runreport": 5,
    "dragons.score.labelling": 5,
    "dragons.score.scorer": 5,
    # 6: commands over both wings
    "dragons.evaluate": 6,
    "dragons.loop.compare": 6,
    "dragons.loop.comparereport": 6,
    # 7: entry points
    "dragons.cli": 7,
    "dragons.score.cli": 7,
    "dragons.loop.cli": 7,
    "dragons.local.cli": 7,
    "dragons.local.demo": 7,
    "dragons.local.s3server": 2,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "dragons").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The dragons modules ``name`` imports (``from dragons.score import table`` is dragons.score.table)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dragons")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if not base.startswith("dragons"):
                continue
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return found - {name}


def test_every_module_has_a_layer_and_imports_nothing_above_it():
    modules = _modules()
    missing = sorted(set(modules) - set(LAYERS))
    assert not missing, f"give these modules a layer in tests/test_layers.py: {missing}"
    up = []
    for name, path in modules.items():
        for dep in _imports(name, path, set(modules)):
            if LAYERS[dep] > LAYERS[name]:
                up.append(f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})")
    assert not up, "imports that run back up the layers:\n" + "\n".join(up)


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) - {"dragons"} for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_benchmarks_and_jobs_import_what_exists() -> None:
    """Scripts outside the package name dragons' modules and names that are there
    (a refactor that moves one breaks its script here, not when it is next run)."""
    import importlib

    missing = []
    scripts = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "jobs").glob("*.py"))
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dragons") and not node.level:
                module = importlib.import_module(node.module)  # type: ignore[arg-type]
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(REPO)}: from {node.module} import {alias.name}")
    assert scripts and not missing, missing


def test_readme_layout_names_every_module() -> None:
    """The README's Layout section names every module of the tree (and so stays true as it changes)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    layout = text.split("### Layout", 1)[1].split("\n#", 1)[0]
    bullets = {b.split("`", 2)[1]: b for b in layout.split("\n* ")[1:]}  # "dragons/train/": its bullet
    missing = []
    for path in sorted((REPO / "dragons").rglob("*.py")):
        rel = path.relative_to(REPO)
        if path.name == "__init__.py":
            continue
        # A folder without a bullet of its own (models/) is described in the dragons/ bullet.
        bullet = bullets.get(f"{'/'.join(rel.parts[:-1])}/", bullets.get("dragons/", ""))
        if f"`{path.stem}" not in bullet:  # `name` or `name.py`
            missing.append(str(rel))
    assert not missing, f"README.md's Layout section does not name: {missing}"
