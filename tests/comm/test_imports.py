"""comm/ imports nothing from experts/ (issue 30): the dispatchers and the experts are
siblings that share neutral modules (quant, weighting, placement), never each other.

Read from the source (every ``import``, including the lazy ones inside functions), and
followed through the package: a comm module that imports a neutral module which imports
experts/ fails too, with the chain."""

from __future__ import annotations

import ast
from pathlib import Path

import rocm_moe

ROOT = Path(rocm_moe.__file__).parent


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    for path in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:`` (types only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in (child, *_runtime_nodes(child)))
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(path: Path, name: str) -> set[str]:
    """The rocm_moe modules ``path`` (module ``name``) imports at run time, anywhere in the
    file (top level and inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}")}
            # ``from pkg import module`` names the module (every module's parent package runs
            # first anyway); ``from module import name`` names the module
            out |= subs if len(subs) == len(node.names) else {base} | subs
    return {m for m in out if m.startswith("rocm_moe") and _module_file(m) is not None}


def import_chains(start: str) -> dict[str, list[str]]:
    """Every rocm_moe module reachable from ``start`` -> the chain of imports reaching it."""
    chains, todo = {start: [start]}, [start]
    while todo:
        mod = todo.pop()
        for dep in sorted(_imports(_module_file(mod), mod)):
            if dep not in chains:
                chains[dep] = [*chains[mod], dep]
                todo.append(dep)
    return chains


def test_the_walker_sees_lazy_imports():
    # the test that can fail: experts/triton_fp8.py imports experts/fp8.py at the top, and
    # integrations/hf.py imports experts/fp8.py inside a function only
    assert "rocm_moe.experts.fp8" in import_chains("rocm_moe.experts.triton_fp8")
    assert "rocm_moe.experts.fp8" in _imports(_module_file("rocm_moe.integrations.hf"),
                                              "rocm_moe.integrations.hf")
    # and skips imports for types only (backends.py names Experts under TYPE_CHECKING)
    assert "rocm_moe.experts.base" not in _imports(_module_file("rocm_moe.backends"),
                                                   "rocm_moe.backends")


def test_comm_imports_nothing_from_experts():
    bad = {}
    for path in sorted((ROOT / "comm").glob("*.py")):
        name = "rocm_moe.comm" + ("" if path.stem == "__init__" else "." + path.stem)
        for dep, chain in import_chains(name).items():
            if dep == "rocm_moe.experts" or dep.startswith("rocm_moe.experts."):
                bad[name] = " -> ".join(chain)
                break
    assert not bad, bad
