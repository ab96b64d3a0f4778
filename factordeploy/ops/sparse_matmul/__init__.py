"""SLTrain's unstructured sparse part S (compress/layers.SparsePlusLowRankLinear) as one custom op.

y[..., o] = sum over the nonzeros (o, i) of S: val * x[..., i]
x [..., in] (activation), idx [nnz] int32 sorted flat row-major indices o * in + i, val [nnz];
attributes in_features, out_features (out is not recoverable from the input shapes, so the body
reads the attributes and ships no model-local function). Output: x's shape with the last dim out.

This package: SPEC (below), the torch reference, the row-padded gather body, the dense refold and their
cost model (lowering.py), the Triton kernel (kernel.py) and its launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import Attr, Launch, Lowering, OpSpec
from .lowering import body, costs, dense_refold


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    return [list(dims[0][:-1]) + [alg.const(attrs["out_features"])]]


def reference(x, idx, val, in_features: int = 0, out_features: int = 0, **_attrs):
    """Torch ground truth: S scattered dense (out x in), one product."""
    import torch

    S = torch.zeros(out_features * in_features, dtype=torch.float32, device=x.device)
    S.scatter_(0, idx.long(), val.float())
    return ((x.float() @ S.view(out_features, in_features).T).to(x.dtype),)


@dataclass
class SparseLaunch(Launch):
    """The atomic gather-scatter kernel on the current stream (an fp32 accumulator when y is not fp32)."""

    inputs: tuple = ()
    output: Any = None
    out_features: int = 0

    def __call__(self) -> Any:
        from .kernel import sparse_matmul

        x, idx, val = self.inputs
        return sparse_matmul(x, idx, val, self.out_features, out=self.output)


def launch(inputs: list, outputs: list, attrs: dict) -> Launch:
    from . import kernel as k  # lazily: TRITON_INTERPRET=1 must be set before triton compiles

    return SparseLaunch(k.sparse_matmul_kernel, (), (), num_warps=k.NUM_WARPS, num_stages=k.NUM_STAGES,
                       inputs=tuple(inputs), output=outputs[0], out_features=int(attrs["out_features"]))


def example(scale: int, dtype, device: str) -> tuple[list, dict]:
    """A MiniLM FFN up-projection's S at SLTrain's delta 0.03: in 384, out 1536; x [8, 16*scale, 384]."""
    import torch

    g = torch.Generator().manual_seed(scale)
    n_in, n_out = 384, 1536
    nnz = round(0.03 * n_in * n_out)
    x = torch.randn(8, 16 * scale, n_in, generator=g).to(dtype=dtype, device=device)
    idx = torch.randperm(n_in * n_out, generator=g)[:nnz].sort().values.to(torch.int32).to(device)
    val = torch.randn(nnz, generator=g).to(dtype=dtype, device=device)
    return [x, idx, val], {"in_features": n_in, "out_features": n_out}


SPEC = OpSpec(
    name="SparseMatMul",
    inputs=("x", "idx", "val"), outputs=("y",),
    input_types=("T", "int32", "T"), output_types=("T",),
    attrs=(Attr("in_features", "int", 0, "columns of S (= x.shape[-1])"),
           Attr("out_features", "int", 0, "rows of S (the output width)")),
    output_shapes=_shapes,
    reference=reference,
    body=body,
    body_name="gather",
    lowerings=(Lowering("dense", dense_refold, refolds=True,
                        doc="S^T as one dense constant and one MatMul: stores out x in values beside the factors"),),
    cost=costs,
    local_function=False,
    launch=launch,
    example=example,
    doc=__doc__ or "",
)
