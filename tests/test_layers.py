"""The packages of refilled/ are layers: each module imports only its own package and the
layers below it (docs/development.md, "What is where"). A module that climbs fails here,
whether the import is at the top of the file or inside a function."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# bottom first: refilled.errors and refilled.runtime, then each package
LAYERS = ["errors", "runtime", "files", "schema", "data", "method", "store", "runs", "tune"]


def layer(module: str) -> int:
    if module == "refilled":  # the package itself (an empty __init__): where it is installed
        return 0
    parts = module.split(".")
    assert parts[0] == "refilled" and len(parts) > 1, module
    assert parts[1] in LAYERS, f"refilled.{parts[1]} is in no layer: add it to LAYERS and docs/development.md"
    return LAYERS.index(parts[1])


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [f"{node.module}.{a.name}" if node.module == "refilled" else node.module for a in node.names]
    return [m for m in found if m == "refilled" or m.startswith("refilled.")]


def modules() -> list[tuple[str, Path]]:
    return [(".".join(p.relative_to(REPO).with_suffix("").parts), p) for p in sorted((REPO / "refilled").rglob("*.py"))]


def test_every_module_imports_only_its_layer_and_those_below():
    climbing = []
    for name, path in modules():
        if name in ("refilled.__init__",):
            continue
        for target in imports(path):
            if layer(target) > layer(name):
                climbing.append(f"{name} imports {target}")
    assert not climbing, climbing


def test_the_layer_test_sees_an_import_that_climbs(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from refilled.tune.search import run_search\n")
    assert [t for t in imports(module) if layer(t) > layer("refilled.store.x")] == ["refilled.tune.search"]


def test_only_the_tune_layer_imports_ray():
    for name, path in modules():
        if not name.startswith("refilled.tune."):
            assert not any(m == "ray" or m.startswith("ray.") for m in _all_imports(path)), name


def _all_imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    return [n for n in names if n not in ("self", "cls")]


def test_no_function_of_the_search_layer_takes_more_than_five_parameters():
    # a function that needs more takes the object that holds them (refilled.tune.trial_inputs)
    wide = [f"{path.relative_to(REPO)}:{node.lineno} {node.name}({', '.join(parameters(node))})"
            for _, path in modules() if path.parent.name == "tune"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(parameters(node)) > 5]
    assert not wide, wide


def test_the_simulated_trials_import_no_torch():
    # benchmarks/search_scale.py runs hundreds of them at once: each a small process
    code = "import sys, simulated_trials; assert 'torch' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(REPO / "benchmarks")}  # as search_scale.py's Ray workers find it
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
