"""The package's shape, read from its source with ``ast`` (nothing imported): imports point down the layers, no
import circle between modules, and only ``nemo_upcycle/engine/`` imports NeMo, Megatron-core, NeMo-Run or Lightning.

Run by hand: ``python tests/test_architecture.py`` prints the layer of every module and any violation.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "nemo_upcycle"
# bottom -> top; a module may import its own layer and the layers below it
LAYERS = ("errors", "system", "core", "formats", "offline", "planning", "data", "evals", "config", "engine", "apps")
HEAVY = ("nemo", "megatron", "nemo_run", "lightning", "pytorch_lightning", "fiddle", "transformer_engine")


def module_name(path: Path) -> str:
    if not path.is_relative_to(PKG.parent):
        return path.stem
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "package"


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import in the file, relative ones resolved."""
    me = module_name(path)
    base = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level:
                    mod = ".".join(base[: len(base) - child.level + 1] + ([mod] if mod else []))
                out.append((mod, child.lineno, in_function))
                out.extend((f"{mod}.{a.name}", child.lineno, in_function) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return out


def graph() -> dict[str, dict[str, tuple[int, bool]]]:
    """module -> {imported nemo_upcycle module: (line, inside a function)}."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    g: dict[str, dict[str, tuple[int, bool]]] = {}
    for mod, path in files.items():
        edges = {}
        for target, line, fn in imports(path):
            if target in files and target != mod and not mod.startswith(target + "."):
                edges.setdefault(target, (line, fn))
        g[mod] = edges
    return g


def heavy_imports() -> list[str]:
    bad = []
    for p in PKG.rglob("*.py"):
        mod = module_name(p)
        if layer(mod) == "engine":
            continue
        for target, line, _ in imports(p):
            if target.split(".")[0] in HEAVY:
                bad.append(f"{p.relative_to(PKG.parent)}:{line} imports {target}")
    return sorted(set(bad))


def upward_imports(g) -> list[str]:
    bad = []
    for mod, edges in g.items():
        if layer(mod) not in LAYERS:
            continue
        for target, (line, _) in edges.items():
            lt = layer(target)
            if lt in LAYERS and LAYERS.index(lt) > LAYERS.index(layer(mod)):
                bad.append(f"{mod}:{line} imports {target} (layer {lt} above {layer(mod)})")
    return sorted(bad)


def cycles(g) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            strong(v)
    return out


def test_every_module_sits_in_a_layer():
    stray = [m for m in graph() if layer(m) not in (*LAYERS, "conf") and m != "nemo_upcycle"]  # conf: YAML only
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_only_the_engine_imports_nemo_megatron_lightning():
    assert not heavy_imports(), "\n".join(heavy_imports())


def test_imports_point_down_the_layers():
    bad = upward_imports(graph())
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    found = cycles(graph())
    assert not found, f"import circles: {found}"


def test_the_checks_catch_what_they_look_for(tmp_path):
    """Negative control: a circle, an upward import and a NeMo import outside the engine are all reported."""
    g = {"nemo_upcycle.core.a": {"nemo_upcycle.apps.b": (1, True)},
         "nemo_upcycle.apps.b": {"nemo_upcycle.core.a": (1, False)}}
    assert cycles(g) == [["nemo_upcycle.apps.b", "nemo_upcycle.core.a"]]
    assert upward_imports(g) == ["nemo_upcycle.core.a:1 imports nemo_upcycle.apps.b (layer apps above core)"]
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from megatron.core import parallel_state\n")
    assert imports(f) == [("megatron.core", 2, True), ("megatron.core.parallel_state", 2, True)]


if __name__ == "__main__":
    g = graph()
    for m in sorted(g):
        print(f"{layer(m):9s} {m}")
    for line in heavy_imports() + upward_imports(g):
        print("VIOLATION", line)
    for c in cycles(g):
        print("CIRCLE", " -> ".join(c))
