"""CoSpaDi's sparse-dictionary product (compress/layers.SparseDictLinear) as one custom op.

y[..., o] = sum_t val[t, o] * (x @ D^T)[..., idx[t, o]]
x [..., in] (activation), D [k, in], idx [s, out], val [s, out]; attributes k, s, out_features
(informational: the shapes carry them too). Output: x's shape with the last dim replaced by out.
The TensorRT plugin declares int32 indices (its I/O types have no int16 and refuse uint8), so the
generic plugin pass widens the 1-2 byte ONNX indices once in the TensorRT graph (reported).

This package: SPEC (below), the torch reference, the standard-op body and the dense-refold lowering
with their cost model (lowering.py), the Triton kernels (kernel.py) and their launch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..spec import Attr, Launch, Lowering, OpSpec
from .lowering import body, costs, dense_refold


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    x, _D, idx, _val = dims
    return [list(x[:-1]) + [idx[-1]]]


def reference(x, D, idx, val, **_attrs):
    """Torch ground truth: the dense codes S (out x k), then two products; never W."""
    import torch

    S = torch.zeros(idx.shape[1], D.shape[0], dtype=torch.float32, device=x.device)
    S.scatter_add_(1, idx.T.long(), val.T.float())
    return (((x.float() @ D.float().T) @ S.T).to(x.dtype),)


@dataclass
class SparseDictLaunch(Launch):
    """Two kernels (dictionary GEMM into an fp32 scratch, then the code gather) on the current stream."""

    inputs: tuple = ()
    output: Any = None

    def __call__(self) -> Any:
        from .kernel import sparse_dict_matmul

        x, D, idx, val = self.inputs
        return sparse_dict_matmul(x, D, idx, val, out=self.output)


def launch(inputs: list, outputs: list, attrs: dict) -> Launch:
    from . import kernel as k  # lazily: TRITON_INTERPRET=1 must be set before triton compiles

    return SparseDictLaunch(k.gather_codes_kernel, (), (), num_warps=k.NUM_WARPS, num_stages=k.NUM_STAGES,
                            inputs=tuple(inputs), output=outputs[0])


def example(scale: int, dtype, device: str) -> tuple[list, dict]:
    """A MiniLM FFN up-projection at 50% bytes: in 384, out 1536, k 230, s 107; x [8, 16*scale, 384]."""
    import torch

    g = torch.Generator().manual_seed(scale)
    k, s, n_in, n_out = 230, 107, 384, 1536
    x = torch.randn(8, 16 * scale, n_in, generator=g).to(dtype=dtype, device=device)
    D = (torch.randn(k, n_in, generator=g) / 20).to(dtype=dtype, device=device)
    idx = torch.argsort(torch.rand(n_out, k, generator=g), dim=1)[:, :s].T.contiguous().to(torch.int32).to(device)
    val = torch.randn(s, n_out, generator=g).to(dtype=dtype, device=device)
    return [x, D, idx, val], {"k": k, "s": s, "out_features": n_out}


SPEC = OpSpec(
    name="SparseDictMatMul",
    inputs=("x", "D", "idx", "val"), outputs=("y",),
    input_types=("T", "T", "int32", "T"), output_types=("T",),
    attrs=(Attr("k", "int", 0, "dictionary atoms"), Attr("s", "int", 0, "atoms per output"),
           Attr("out_features", "int", 0, "outputs (= idx.shape[1])")),
    output_shapes=_shapes,
    reference=reference,
    body=body,
    body_name="gather",
    lowerings=(Lowering("dense", dense_refold, refolds=True,
                        doc="W^T = (S D)^T as one constant and one MatMul: fastest on a CPU GEMM, no size saving"),),
    cost=costs,
    ort_flag="ort-sparse-dict",
    launch=launch,
    example=example,
    doc=__doc__ or "",
)
