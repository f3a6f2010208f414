"""The OPOB package has no import cycle: tape -> step -> hook, distributed imported, never importing back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vcpo_optim

PKG = Path(vcpo_optim.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _exists(name: str) -> bool:
    rel = Path(*name.split("."))
    root = PKG.parent
    return (root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists()


def _graph() -> dict[str, set[str]]:
    """Edges between vcpo_optim modules from every import statement (lazy ones included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        name = _module_name(path)
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("vcpo_optim"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("vcpo_optim"):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}")]
                if subs and len(subs) == len(node.names):
                    deps.update(subs)  # `from . import distributed`: the submodule only
                else:
                    deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for d in graph.get(stack.pop(), ()):
            if d not in seen:
                seen.add(d)
                stack.append(d)
    return seen


def test_no_import_cycle_among_opob_modules():
    graph = _graph()
    opob = {m for m in graph if m.startswith("vcpo_optim.opob.")}
    cycles = sorted(m for m in opob if m in _reach(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_distributed_never_imports_hook_or_step():
    graph = _graph()
    reach = _reach(graph, "vcpo_optim.opob.distributed")
    for forbidden in ("vcpo_optim.opob.hook", "vcpo_optim.opob.step", "vcpo_optim.opob.tape"):
        assert forbidden not in reach, f"opob/distributed.py imports {forbidden}"
    assert "vcpo_optim.opob.hook" not in _reach(graph, "vcpo_optim.opob.step")
    assert "vcpo_optim.opob.step" not in _reach(graph, "vcpo_optim.opob.tape")
    # the checker itself can see an edge: the package imports hook, hook imports step
    assert "vcpo_optim.opob.step" in _reach(graph, "vcpo_optim.opob")


def test_each_opob_module_imports_first_in_a_fresh_interpreter():
    # the three pieces and the class that wires them (each also imports the package first)
    mods = [f"vcpo_optim.opob.{m}" for m in ("distributed", "tape", "step", "hook")]
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", f"import {m}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(PKG.parent),
        )
        for m in mods
    }
    failed = {}
    for m, p in procs.items():
        out, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            failed[m] = out[-2000:]
    assert not failed, failed


@pytest.mark.parametrize("name", ["OPOB", "DistributedOPOB"])
def test_public_names(name):
    import vcpo_optim.opob as opob

    assert getattr(opob, name) is vcpo_optim.OPOB
