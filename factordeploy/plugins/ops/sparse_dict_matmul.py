"""SparseDictMatMul: CoSpaDi's layer (compress/layers.SparseDictLinear) as a plugin op.

y[..., o] = sum_t val[t, o] * (x @ D^T)[..., idx[t, o]]
x [..., in] (activation), D [k, in], idx [s, out] (int32 in the TensorRT graph: passes/sparse_dict
widens the 1-2 byte ONNX indices), val [s, out]; attributes k, s, out_features (informational:
the shapes carry them too). Output: x's shape with the last dim replaced by out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import register_op
from ..spec import Attr, Launch, OpSpec


def _shapes(dims: list[list[Any]], attrs: dict, alg: Any) -> list[list[Any]]:
    x, _D, idx, _val = dims
    return [list(x[:-1]) + [idx[-1]]]


def reference(x, D, idx, val, **_attrs):
    """Torch ground truth: the dense codes S (out x k), then two products; never W."""
    import torch

    S = torch.zeros(idx.shape[1], D.shape[0], dtype=torch.float32, device=x.device)
    S.scatter_add_(1, idx.T.long(), val.T.float())
    return (((x.float() @ D.float().T) @ S.T).to(x.dtype),)


def decompose(graph: Any, node: Any, attrs: dict) -> list[Any]:
    """Standard ops for ONNX Runtime: the cheaper of gather / dense refold (passes/sparse_dict.py)."""
    from ...passes.sparse_dict import choose, decomposition_nodes

    how, _ = choose(node)
    return decomposition_nodes(node, how, {})


@dataclass
class SparseDictLaunch(Launch):
    """Two kernels (dictionary GEMM into an fp32 scratch, then the code gather) on the current stream."""

    inputs: tuple = ()
    output: Any = None

    def __call__(self) -> Any:
        from ..kernels.sparse_dict import sparse_dict_matmul

        x, D, idx, val = self.inputs
        return sparse_dict_matmul(x, D, idx, val, out=self.output)


def launch(inputs: list, outputs: list, attrs: dict) -> Launch:
    from ..kernels import sparse_dict as k

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


SPEC = register_op(OpSpec(
    name="SparseDictMatMul",
    inputs=("x", "D", "idx", "val"), outputs=("y",),
    input_types=("T", "T", "int32", "T"), output_types=("T",),
    attrs=(Attr("k", "int", 0, "dictionary atoms"), Attr("s", "int", 0, "atoms per output"),
           Attr("out_features", "int", 0, "outputs (= idx.shape[1])")),
    output_shapes=_shapes,
    reference=reference,
    decompose=decompose,
    launch=launch,
    example=lambda scale, dtype, device: example(scale, dtype, device),
    doc=__doc__ or "",
))
