"""A pass pipeline over ONNX models: a list of named passes, each model -> model, each logged.

Passes take and return an `onnx.ModelProto` so metadata-aware passes (annotation) and
onnx-graphsurgeon passes compose; `graph_pass` adapts a gs.Graph function, always ending
with the gs idiom `graph.cleanup().toposort()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import onnx_graphsurgeon as gs

from ..progress import log

PassFn = Callable[[onnx.ModelProto, "PassContext"], onnx.ModelProto]


@dataclass
class PassContext:
    """Shared facts passes may read (layer manifest, target backend) and the log they write."""

    layers: dict[str, dict] = field(default_factory=dict)  # factorized layer name -> describe()
    target: str = "ort"  # "ort" or "trt"
    log: list[dict] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    scratch: dict[str, Any] = field(default_factory=dict)  # facts one pass hands to its own wrapper (not logged)

    def note(self, pass_name: str, **facts: Any) -> None:
        self.info.setdefault(pass_name, {}).update(facts)


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    description: str = ""

    def __call__(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        return self.fn(model, ctx)


def graph_pass(name: str, description: str = "") -> Callable[[Callable[[gs.Graph, PassContext], None]], Pass]:
    """Decorator: a function mutating a gs.Graph becomes a Pass on ModelProto."""

    def wrap(fn: Callable[[gs.Graph, PassContext], None]) -> Pass:
        def run(model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
            graph = gs.import_onnx(model)
            fn(graph, ctx)
            graph.cleanup().toposort()
            out = gs.export_onnx(graph)
            out.ir_version = model.ir_version
            del out.metadata_props[:]
            out.metadata_props.extend(model.metadata_props)
            return out

        return Pass(name, run, description or (fn.__doc__ or "").strip().splitlines()[0])

    return wrap


def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


def run_pipeline(model: onnx.ModelProto, passes: list[Pass], ctx: PassContext) -> onnx.ModelProto:
    """Apply passes in order, logging node counts and time for each."""
    for p in passes:
        before = len(model.graph.node)
        t0 = time.perf_counter()
        model = p(model, ctx)
        entry = {"pass": p.name, "nodes_before": before, "nodes_after": len(model.graph.node),
                 "seconds": round(time.perf_counter() - t0, 3), **ctx.info.get(p.name, {})}
        ctx.log.append(entry)
        log(f"pass {p.name}: {before} -> {entry['nodes_after']} nodes")
    return model
