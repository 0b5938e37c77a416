"""No import cycle inside ``transfer/``: the graph of imports is acyclic — import-time ones, and also those deferred
into functions (a cycle hidden that way is still two modules that cannot be understood apart) — and every module
imports first (a cycle shows there as an ImportError on a partly initialised module).
Type-only imports (``if TYPE_CHECKING:``) are no edge."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "transfer"


def module_files(package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is its ``__init__.py``)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _import_time_nodes(body: list[ast.stmt], *, deferred: bool = False):
    """Import statements that run when the module is imported (with ``deferred``, also those inside functions and
    classes' methods); never those under ``if TYPE_CHECKING:`` (type-only)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if deferred:
                yield from _import_time_nodes(node.body, deferred=deferred)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _import_time_nodes(node.orelse, deferred=deferred)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_time_nodes(getattr(node, field, []) or [], deferred=deferred)


def import_graph(modules: dict[str, Path], *, deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports at import time (with ``deferred``, also inside functions);
    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``."""

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _import_time_nodes(ast.parse(path.read_text(), str(path)).body, deferred=deferred):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}".rstrip(".")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            graph[module] |= {t for t in map(owner, targets) if t and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():  # the check below can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_reads_type_only_and_function_imports_as_no_edge(tmp_path):
    src = ("from typing import TYPE_CHECKING\nfrom transfer import weights\nif TYPE_CHECKING:\n"
           "    from transfer.config import RunConfig\ndef f():\n    from transfer import run\n")
    path = tmp_path / "m.py"
    path.write_text(src)
    modules = {"transfer.m": path, "transfer.weights": path, "transfer.config": path, "transfer.run": path}
    assert import_graph(modules)["transfer.m"] == {"transfer.weights"}
    assert import_graph(modules, deferred=True)["transfer.m"] == {"transfer.weights", "transfer.run"}


@pytest.mark.parametrize("deferred", [False, True], ids=["import-time", "with-deferred"])
def test_no_import_cycle_inside_transfer(deferred):
    modules = module_files()
    assert "transfer.backbones.builder" in modules and "transfer.weights" in modules
    cycle = find_cycle(import_graph(modules, deferred=deferred))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def _own(name: str) -> bool:
    return name.partition(".")[0] in ("transfer", "tasks", "video")


def test_every_transfer_module_imports_first():
    # transfer's modules are forgotten before each import, so each is imported first, as a user's
    # `python -c "import transfer.x"` would (third-party libraries load once, as in one interpreter). This process's
    # own modules are put back afterwards, and first-party modules the loop imported are forgotten again.
    import importlib
    import traceback

    names = sorted(m for m in module_files() if not m.endswith("__main__"))
    before = dict(sys.modules)
    failed = []
    try:
        for name in names:
            for loaded in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - every failure is reported with its last line
                failed.append(f"{name}: {traceback.format_exc().strip().splitlines()[-1]}")
    finally:
        for loaded in [m for m in sys.modules if _own(m) and before.get(m) is not sys.modules[m]]:
            del sys.modules[loaded]
        sys.modules.update({m: module for m, module in before.items() if _own(m)})
    assert not failed, "modules that fail to import first:\n" + "\n".join(failed)


def test_a_config_is_checked_without_the_training_libraries(tmp_path):
    """Composing and validating a run of each adapter (all a refused value costs) imports neither Lightning, timm
    nor torchvision: ``python -m transfer.run`` answers a typo in about the time of ``import torch``. A fresh
    interpreter, since this one has imported them long ago; ``bench/bench_startup.py`` measures the time.
    (Detection's checks are segmentation's plus detectron2's model-zoo lookup where it is installed: left out for
    the time that costs.)"""
    script = (
        "import sys\n"
        "from transfer.config import compose, validate\n"
        f"for task in {['cifar100', 'imagenet', 'kinetics400', 'nyu_depth', 'voc_semseg']!r}:\n"
        f"    validate(compose([f'task={{task}}', 'task.data_dir={tmp_path}']))  # each passes every check\n"
        "print(sorted({'lightning', 'timm', 'torchvision'} & {m.partition('.')[0] for m in sys.modules}))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
