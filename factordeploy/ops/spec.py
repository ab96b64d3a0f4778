"""The per-op description every custom op provides (`OpSpec`), and the small vocabularies it uses.

An op spec is pure data + functions; it never imports TensorRT. The export emit (ops/export.py),
the ORT lowering and model-local function passes (passes/custom_ops.py), the TensorRT plugin class
(plugins/trt_plugin.py), the Quickly-Deployable-Plugin registration (plugins/qdp.py) and the GPU
contract benchmark all read the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

# dtype names used in specs; mapped to TensorRT / torch / ONNX types by the consumers
FLOAT_TYPES = ("float32", "float16", "bfloat16")
ATTR_KINDS = ("int", "float", "ints", "floats")


@dataclass(frozen=True)
class Attr:
    """A node attribute that reaches the plugin (declared in the creator's field_names and serialized)."""

    name: str
    kind: str  # "int" | "float" | "ints" | "floats"
    default: Any
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise ValueError(f"attribute {self.name}: kind must be one of {ATTR_KINDS}, got {self.kind}")


class ShapeAlgebra(Protocol):
    """Integer arithmetic on dimensions. Ints in Python/tests; IDimensionExpr inside TensorRT."""

    def const(self, v: int) -> Any: ...
    def add(self, a: Any, b: Any) -> Any: ...
    def sub(self, a: Any, b: Any) -> Any: ...
    def mul(self, a: Any, b: Any) -> Any: ...
    def floordiv(self, a: Any, b: Any) -> Any: ...
    def ceildiv(self, a: Any, b: Any) -> Any: ...


class IntAlgebra:
    """ShapeAlgebra with Python operators: plain ints (reference checks), torch SymInts (export),
    and QDP's symbolic sizes (plugins/qdp.py overrides only ceildiv)."""

    def const(self, v: int) -> int:
        return int(v)

    def add(self, a: int, b: int) -> int:
        return a + b

    def sub(self, a: int, b: int) -> int:
        return a - b

    def mul(self, a: int, b: int) -> int:
        return a * b

    def floordiv(self, a: int, b: int) -> int:
        return a // b

    def ceildiv(self, a: int, b: int) -> int:
        return -(-a // b)


Dims = list  # a list of dimension values (ints or IDimensionExpr), outermost first
ShapeRule = Callable[[Sequence[Dims], dict, ShapeAlgebra], list[Dims]]


@dataclass
class Launch:
    """One kernel launch exactly as `enqueue` performs it (the plugin's kernel contract).

    `kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)`; args are
    torch tensors (device buffers TensorRT handed over) and Python scalars, in kernel order.
    """

    kernel: Any  # a triton JITFunction
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2

    def __call__(self) -> Any:
        """Launch; returns Triton's compiled-kernel handle (name, num_warps, shared memory) where it gives one."""
        return self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps,
                                      num_stages=self.num_stages)


@dataclass
class AotKernel:
    """What a QDP `aot_impl` returns, before packing: a Triton kernel compiled for the engine.

    signature/constants go to triton.compiler.ASTSource; grid is a tuple of trtp symbolic
    expressions; extra_args are the int32 scalar arguments (trtp.SymInt32) after the tensor pointers.
    """

    kernel: Any
    signature: Any
    constants: dict[str, Any]
    grid: tuple[Any, ...]
    extra_args: list[Any]


@dataclass(frozen=True)
class Lowering:
    """One way to run a custom node on ONNX Runtime besides the op's standard-op body.

    build(node, attrs, prefix) -> standard-op gs.Nodes computing node.outputs from node.inputs
    (constant inputs may be read at rewrite time, e.g. to refold a dense matrix). `refolds`: the
    lowering stores a dense weight again (no size saving in model.onnx; the report says so).
    """

    name: str
    build: Callable[..., list]
    refolds: bool = False
    doc: str = ""


BodyFn = Callable[..., None]  # (b: ops.body.Body, inputs, outputs, attrs) -> None, writes nodes into b


@dataclass(frozen=True)
class OpSpec:
    """Everything the framework needs to turn a custom-domain ONNX node into a plugin layer.

    - name: the ONNX op_type and the TensorRT plugin (creator) name.
    - inputs / outputs: names, in order (docs, decomposition, benchmarks).
    - input_types / output_types: per tensor, a type variable ("T": any of `float_types`, all "T"
      tensors share one type) or a concrete dtype name ("int32", "int64", ...).
    - attrs: attributes with kinds and defaults (serialized into the engine).
    - output_shapes(input_dims, attrs, algebra) -> one dims list per output; written once with the
      ShapeAlgebra so it serves TensorRT's expression builder and plain ints alike.
    - reference(*tensors, **attrs) -> tuple of torch tensors: the ground truth.
    - body(b, inputs, outputs, attrs): the op's ONE standard-op body, written with onnx-graphsurgeon
      through ops.body.Body; it becomes both the ORT lowering named `body_name` (inlined per node)
      and the ONNX model-local function shipped in the TensorRT graph (so ORT runs that file too).
    - lowerings (optional): more ORT lowerings (`Lowering`), and `cost(consts, attrs)` -> modelled
      seconds per lowering name (consts: each input's constant array or None), with which
      the generic lowering pass picks one per node under the "cost" policy.
    - ort_flag (optional): the `deploy build` flag that sets this op's ORT lowering policy.
    - launch(inputs, outputs, attrs) -> Launch: the Triton launch for torch tensors already on the
      GPU; `enqueue` calls it on TensorRT's stream, benchmarks/gpu calls it directly.
    - aot (optional): (input TensorDescs, output TensorDescs, attrs, trtp, input dtype names) -> AotKernel, for full
      TensorRT's Quickly Deployable Plugins: the Triton kernel compiled to PTX and embedded in the
      engine, so the engine runs without Python (see plugins/qdp.py).
    - native: the op needs no plugin: its body uses only ops TensorRT implements itself (QDQ weights),
      so the TensorRT pipeline inlines the body as the ORT one lowers the node; `launch` is None.
    - min_opset: the default-domain opset the body needs; the pass that inlines it raises the graph's.
    - example (optional): (scale: int, dtype: torch.dtype, device: str) -> (input tensors, attrs);
      benchmarks/gpu/plugin_contract.py uses it to launch the kernel exactly as enqueue does.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]
    attrs: tuple[Attr, ...]
    output_shapes: ShapeRule
    reference: Callable[..., tuple]
    body: BodyFn
    launch: Callable[[list, list, dict], Launch] | None
    body_name: str = "standard"
    lowerings: tuple[Lowering, ...] = ()
    cost: Callable[[list, dict], dict[str, float]] | None = None
    ort_flag: str = ""
    ort_default: str = ""  # the ORT policy when no flag sets one ("" = the first of `policies()`)
    native: bool = False  # the body is standard ops TensorRT reads natively (e.g. QDQ weights): no plugin
    min_opset: int = 0  # default-domain opset the body needs (21: blocked DequantizeLinear, INT4)
    local_function: bool = True  # body reads no attributes, so it can ship as a model-local function
    float_types: tuple[str, ...] = FLOAT_TYPES
    aot: Callable[..., "AotKernel"] | None = None  # optional: full TensorRT QDP ahead-of-time path (plugins/qdp.py)
    example: Callable[..., tuple[list, dict]] | None = None  # optional: (shape_scale, dtype, device) -> (inputs, attrs)
    version: str = "1"
    namespace: str = "factordeploy"
    domain: str = "factordeploy"
    doc: str = ""

    def __post_init__(self) -> None:
        if len(self.input_types) != len(self.inputs) or len(self.output_types) != len(self.outputs):
            raise ValueError(f"{self.name}: input_types/output_types must match inputs/outputs")
        if self.launch is None and not self.native:
            raise ValueError(f"{self.name}: a plugin op needs a kernel launch (only native ops have none)")

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def lowering_names(self) -> tuple[str, ...]:
        return (self.body_name,) + tuple(lw.name for lw in self.lowerings)

    def policies(self) -> tuple[str, ...]:
        """Allowed ORT lowering policies: "cost" (per node, needs a cost model) or one lowering for all."""
        return (("cost",) if self.cost is not None else ()) + self.lowering_names()

    def default_policy(self) -> str:
        return self.ort_default or self.policies()[0]

    def attr_values(self, given: dict | None = None) -> dict[str, Any]:
        """Defaults overlaid with `given` (unknown keys ignored), cast to each attribute's kind."""
        given = given or {}
        out = {}
        for a in self.attrs:
            v = given.get(a.name, a.default)
            out[a.name] = _cast(a.kind, v)
        return out

    def resolve_types(self, in_types: Sequence[str]) -> list[str]:
        """Output dtype names for input dtype names (type variable bound by the first "T" input)."""
        bound = next((t for t, v in zip(in_types, self.input_types) if v == "T"), "float32")
        return [bound if v == "T" else v for v in self.output_types]

    def accepts(self, pos: int, dtype: str, earlier: Sequence[str]) -> bool:
        """May tensor `pos` (inputs then outputs) have `dtype`, given the dtypes chosen for 0..pos-1?"""
        kinds = list(self.input_types) + list(self.output_types)
        want = kinds[pos]
        if want != "T":
            return dtype == want
        if dtype not in self.float_types:
            return False
        prior = [d for d, k in zip(earlier, kinds) if k == "T"]
        return not prior or prior[0] == dtype


def _cast(kind: str, v: Any) -> Any:
    import numpy as np

    if kind == "int":
        return int(np.asarray(v).reshape(-1)[0]) if not isinstance(v, (int, np.integer)) else int(v)
    if kind == "float":
        return float(np.asarray(v).reshape(-1)[0]) if not isinstance(v, (float, int, np.number)) else float(v)
    if kind == "ints":
        return [int(x) for x in np.asarray(v).reshape(-1)]
    return [float(x) for x in np.asarray(v).reshape(-1)]
