"""The layout's rules (ARCHITECTURE.md), checked on every import, lazy ones included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: worker/'s packages from the outside in: a package imports only packages to its right.
WORKER_ORDER = ["commands", "hosting", "engine", "backends", "models"]


def imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_producer_never_imports_worker() -> None:
    offenders = [f"{p.relative_to(REPO)}: {name}" for p in modules("producer") for name in imports(p)
                 if name == "worker" or name.startswith("worker.")]
    assert not offenders, offenders


def test_the_contract_never_imports_the_facade() -> None:
    flat = [p for p in modules("producer") if p.parent.name == "producer"]
    offenders = [f"{p.name}: {name}" for p in flat for name in imports(p) if name.startswith("producer.http")]
    assert not offenders, offenders


def test_worker_packages_import_only_inwards() -> None:
    offenders = []
    for path in modules("worker"):
        here = path.relative_to(REPO / "worker").parts
        if len(here) < 2 or here[0] not in WORKER_ORDER:
            continue
        rank = WORKER_ORDER.index(here[0])
        for name in imports(path):
            parts = name.split(".")
            if parts[0] == "worker" and len(parts) > 1 and parts[1] in WORKER_ORDER:
                if WORKER_ORDER.index(parts[1]) < rank:
                    offenders.append(f"{'/'.join(here)} imports {name}")
            if parts[:2] == ["worker", "sinks"] and here[0] not in ("commands", "hosting"):
                offenders.append(f"{'/'.join(here)} imports {name}")
    assert not offenders, offenders


def test_benchmarks_import_the_package_not_each_other() -> None:
    allowed = {"bench.common", "bench.workloads"}
    offenders = [f"{p.name}: {name}" for p in sorted((REPO / "bench").glob("*.py")) for name in imports(p)
                 if (name.startswith("bench.") and name.split(".")[0:2] != ["bench", "common"]
                     and ".".join(name.split(".")[:2]) not in allowed) or name.startswith("tests")]
    assert not offenders, offenders


def test_every_module_says_what_it_owns() -> None:
    missing = [str(p.relative_to(REPO)) for p in modules("producer") + modules("worker")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing


def test_the_architecture_document_names_every_module() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text()
    unnamed = [str(p.relative_to(REPO)) for p in modules("producer") + modules("worker")
               if p.name != "__init__.py" and p.name not in text]
    assert not unnamed, f"ARCHITECTURE.md does not name: {unnamed}"


def test_no_import_cycle() -> None:
    """Among the package's own modules, counting every import (lazy ones too)."""
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in modules("producer") + modules("worker")}
    graph = {name: {target for target in (i for i in imports(path)) if target in names and target != name}
             for name, path in names.items()}
    for name in graph:  # a package's __init__ imports nothing here; an import of a package is not an edge
        graph[name] = {t for t in graph[name] if not (REPO / t.replace(".", "/")).is_dir()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target] if target in path else [node, target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not cycles, cycles


def test_child_processes_import_this_checkout(tmp_path: Path) -> None:
    """A process the tests start (a fleet worker, a CLI run) runs this checkout's code, wherever the
    virtualenv's editable install points (``tests/conftest.py`` sets ``PYTHONPATH``). Before, a git
    worktree sharing another checkout's .venv ran that checkout's worker in every subprocess."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import producer, worker; print(producer.__file__, worker.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.split() == [str(REPO / "producer" / "__init__.py"), str(REPO / "worker" / "__init__.py")]
