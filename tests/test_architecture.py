"""The package's shape, checked: layer order of imports, no cycles, one home per custom op.

LAYERS lists factordeploy's top-level modules/packages from the bottom up. A module may import
from its own layer or any layer below, never above; and the module import graph (every import,
module-level or inside a function) has no cycle. To add a package (e.g. `train/`, `serve/`), put
its name into the row it belongs to (or a new row): nothing else here changes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "factordeploy"

LAYERS: list[tuple[str, ...]] = [
    ("__init__", "errors", "progress", "ranges"),  # leaves: no factordeploy imports (ranges: every option range, click types)
    ("interrupts", "outdir"),            # signals as exceptions; safe writes (--out, caches, checkpoints)
    ("ops",),                            # custom ops: spec, body, emit, one package per op
    ("models",),
    ("train",),                          # the one training loop (generic: loss and data plugged in)
    ("compress", "attention"),          # attention/: structured attention replacing a model's attention core
    ("recover",),                        # recovery stage: distillation + adapters merged into factors
    ("export",),
    ("passes",),
    ("plugins",),
    ("engines",),
    ("serve",),                          # generation runtime, files for other stacks, Triton repository, folder reading
    ("verify",),
    ("report", "config"),                # typed report; BuildConfig + input checks
    ("stages",),                         # the build's stage functions over BuildState
    ("build", "pipeline"),               # the stage list for `deploy build`; the benchmarks' use of it
    ("pretrain",),                       # pretraining from scratch (models, compress layers, train loop)
    ("sweep",),                          # runs builds
    ("cli", "cli_serving"),
]
RANK = {name: i for i, row in enumerate(LAYERS) for name in row}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """factordeploy modules imported anywhere in `path` (absolute and relative, any depth)."""
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "factordeploy"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "factordeploy":
                continue
            out.add(mod)
            for a in node.names:  # `from . import x` may import a submodule
                if (PKG.parent / Path(*f"{mod}.{a.name}".split("."))).with_suffix(".py").exists() or \
                        (PKG.parent / Path(*f"{mod}.{a.name}".split("."))).is_dir():
                    out.add(f"{mod}.{a.name}")
    out.discard(me)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PKG.rglob("*.py")}


def _top(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_module_has_a_layer():
    tops = {_top(m) for m in _graph()}
    assert tops <= set(RANK), f"add {sorted(tops - set(RANK))} to LAYERS in tests/test_architecture.py"


def test_no_upward_imports():
    bad = [f"{m} -> {t}" for m, deps in _graph().items() for t in deps
           if RANK[_top(t)] > RANK[_top(m)]]
    assert not bad, "imports pointing up the layers: " + "; ".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    # a package's __init__ importing its own submodules is the package itself, not a cycle
    edges = {m: {d for d in deps if d in graph and not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def _package_ops() -> list[str]:
    """Names of the ops shipped in factordeploy/ops/ (not test-only ops a test registered)."""
    import importlib

    from factordeploy.ops import OP_PACKAGES

    return [importlib.import_module(f"factordeploy.ops.{p}").SPEC.name for p in OP_PACKAGES]


def test_each_custom_op_named_once_in_the_package():
    """An op's name lives in its own package's spec only; everything else reads the spec."""
    assert _package_ops()
    for name in _package_ops():
        hits = [f"{p.relative_to(PKG)}:{i}" for p in PKG.rglob("*.py")
                for i, line in enumerate(p.read_text().splitlines(), 1) if name in line]
        assert len(hits) == 1, f"{name} appears {len(hits)} times: {hits}"


def test_generic_code_names_no_op_and_no_layer_kind():
    """passes/, plugins/ and engines/ never branch on an op name or a layer kind string."""
    from factordeploy.compress.layers import FactorizedLinear

    def kinds(cls):
        for sub in cls.__subclasses__():
            yield sub.kind
            yield from kinds(sub)

    words = set(_package_ops()) | {k for k in kinds(FactorizedLinear) if k not in ("factorized",)}
    hits = []
    for sub in ("passes", "plugins", "engines"):
        for p in (PKG / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in words:
                    hits.append(f"{p.relative_to(PKG)}:{node.lineno} {node.value!r}")
    assert not hits, hits
