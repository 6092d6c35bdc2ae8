"""The house's rule for imports inside functions: only to keep a heavy import off a path that does not need it.

An import belongs at the top of its module. One inside a function stays only when
it keeps something in :data:`HEAVY` off the importing module's own import path:
the module it names is heavy itself (or an optional extra), or it is a dragons
module whose module-level imports bring in something heavy, and the importing
module does not already import that at module level. Anything else (stdlib,
``dragons.errors``, ``dragons.storage`` when the importer already has pyarrow, ...)
goes at the top. A lazy import needs no comment of its own: its reason is here.
An import cycle is never the reason: tests/test_layers.py forbids cycles through
lazy imports too. (Asking whether an optional extra is there,
``importlib.util.find_spec("matplotlib")``, imports nothing and is not concerned.)

The numbers are ``python -c "import time; t=time.perf_counter(); import X; ..."``,
the best of three on the 2-core development machine (under load, so on the high
side), on top of what the key's parent already loaded where the key is dotted.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from test_layers import _modules

REPO = Path(__file__).resolve().parents[1]

# Module (or package) -> why importing it is heavy. A dotted key is heavy on top of its parent.
HEAVY: dict[str, str] = {
    "ray": "0.9 s, though it joins and starts nothing: predict, query, report, export and labels do without it",
    "ray.data": "another 1.0 s on top of ray: only the steps that build a Dataset (scoring, train's scan) use it",
    "ray.train": "another 1.0 s on top of ray: training's driver and workers only",
    "ray.train.torch": "another 0.2 s on top of ray.train and torch: training only",
    "torch": "3.6 s and hundreds of MB: query, report, export, table and score's listing tasks do without it",
    "torchvision": "another 3.1 s on top of torch: only a torchvision backbone (not EfficientNet-Lite) needs it",
    "matplotlib": "0.6 s (pyplot another 0.5 s), and the optional `report` extra: a node without it still trains",
    "numpy": "0.2 s: `import dragons.cli` (every command's start, jobs/*.py) does without it",
    "pyarrow": "0.2 s with numpy, +42 MB resident: `import dragons.cli` does without it",
    "pyarrow.compute": "another 0.1 s on top of pyarrow (pydoc, email and urllib come with its docstrings): "
    "the parsers of query, report and export do without it",
    "pyarrow.dataset": "another 0.6 s on top of pyarrow: only the incremental run's skip sets use it",
    "duckdb": "0.15 s and a 37 MB native library: only SQL over a table (query, report, skips, labels) uses it",
    "deltalake": "0.09 s and a 129 MB native library (+20 MB resident): predict and training's workers do without it",
    "boto3": "0.3 s: only S3's own calls (listing, conditional puts, write probes, the demo's bucket) use it",
    "botocore": "botocore.config alone is 0.17 s: as boto3",
}


MODULES = _modules()  # every dragons module by name, as test_layers reads them


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")
    )


def _targets(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The modules an import statement loads: ``from dragons.score import export`` is dragons.score.export,
    ``from pyarrow import csv`` is pyarrow.csv (and pyarrow), and importing a.b.c loads a and a.b too."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        found = {a.name for a in node.names}
    else:
        base = node.module or ""
        if node.level:  # relative import
            package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(parts + ([base] if base else []))
        found = {base} | {f"{base}.{a.name}" for a in node.names if a.name != "*"}
        # a name that is not a dragons module is a name in the module (other packages: counted as a
        # possible submodule, which only ever matches a HEAVY key when it is one)
        found = {m for m in found if not m.startswith("dragons") or m == base or m in MODULES}
    return {".".join(m.split(".")[: i + 1]) for m in found for i in range(m.count(".") + 1)}


def _walk(name: str) -> tuple[set[str], list[tuple[int, ast.Import | ast.ImportFrom]]]:
    """Module ``name``'s module-level imports (what importing it loads, ``if TYPE_CHECKING:`` left out)
    and its imports inside functions, with their lines."""
    top: set[str] = set()
    lazy: list[tuple[int, ast.Import | ast.ImportFrom]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if in_function:
                    lazy.append((child.lineno, child))
                else:
                    top.update(_targets(name, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(MODULES[name].read_text(encoding="utf-8")), False)
    return top, lazy


WALKED = {name: _walk(name) for name in MODULES}


def _heavy_keys(module: str) -> set[str]:
    """The HEAVY keys that importing a non-dragons module loads by its name (a.b.c loads a and a.b)."""
    return {key for key in HEAVY if module == key or module.startswith(key + ".")}


def _loads(name: str, seen: set[str] | None = None) -> set[str]:
    """The HEAVY keys importing dragons module ``name`` loads, through the dragons modules it imports."""
    seen = set() if seen is None else seen
    seen.add(name)
    heavy: set[str] = set()
    for module in WALKED[name][0]:
        if module in MODULES:
            if module not in seen:
                heavy |= _loads(module, seen)
        else:
            heavy |= _heavy_keys(module)
    return heavy


LOADS = {name: _loads(name) for name in MODULES}


def _heavy_of(modules: set[str]) -> set[str]:
    heavy: set[str] = set()
    for module in modules:
        heavy |= LOADS[module] if module in MODULES else _heavy_keys(module)
    return heavy


def test_imports_inside_functions_keep_something_heavy_off_the_path():
    wrong = []
    for name, path in MODULES.items():
        already = LOADS[name]
        for line, node in WALKED[name][1]:
            targets = _targets(name, node)
            if _heavy_of(targets) - already:
                continue  # it keeps something heavy off this module's import path
            what = ast.unparse(node)
            wrong.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert not wrong, (
        "imports inside functions that keep nothing heavy (tests/test_imports.py's HEAVY) off the path: "
        "move them to the top of the module\n" + "\n".join(wrong)
    )


def test_every_heavy_module_is_imported_somewhere():
    """HEAVY names only modules dragons imports (an entry outlives its reason otherwise)."""
    imported: set[str] = set()
    for name in MODULES:
        top, lazy = WALKED[name]
        imported |= _heavy_of(top) | _heavy_of({t for _, node in lazy for t in _targets(name, node)})
    assert set(HEAVY) <= imported, sorted(set(HEAVY) - imported)


def test_the_command_line_starts_light():
    """``import dragons.cli`` and every command's parser (``dragons --help``) in a fresh interpreter:
    what they load of the heavy modules."""
    code = (
        "import json, sys\n"
        "import dragons.cli\n"
        "after_import = sorted(m for m in sys.modules)\n"
        "dragons.cli.usage()\n"
        "print(json.dumps([after_import, sorted(sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    after_import, after_usage = (set(x) for x in json.loads(out.stdout.strip().splitlines()[-1]))
    # import dragons.cli: nothing heavy at all (a command's own modules are imported when it runs)
    assert not (set(HEAVY) & after_import), sorted(set(HEAVY) & after_import)
    # Every parser (dragons --help): no Ray, no SQL engine, no delta-rs, no plotting, no boto3. They do load
    # torch, numpy and pyarrow today: the train and lr-find parsers name the backbones and augmentation presets
    # (dragons.models.registry, dragons.preprocess), and the table parser's MaintenanceConfig comes from
    # dragons.score.maintenance, which imports dragons.score.table (pyarrow.compute). No worse than that.
    today = {"torch", "numpy", "pyarrow", "pyarrow.compute"}
    assert set(HEAVY) & after_usage <= today, sorted(set(HEAVY) & after_usage - today)
