"""Small ONNX graphs for the TensorRT tests (built with onnx-graphsurgeon, no model download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs


def plugin_graph(path: Path, k: int = 64, n: int = 48, alpha: float = 0.5, relu: int = 1,
                 dtype: type = np.float32, seed: int = 0) -> tuple[Path, np.ndarray]:
    """x[B, S, K] -> ScaledMatMul(x, W const) -> Relu-free tail; dynamic B and S. Returns (path, W)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(dtype)
    x = gs.Variable("x", dtype, ["B", "S", k])
    y = gs.Variable("y", dtype)
    node = gs.Node("ScaledMatMul", "blk/smm0", attrs={"alpha": alpha, "relu": relu}, inputs=[x, gs.Constant("w", w)],
                   outputs=[y], domain="factordeploy")
    g = gs.Graph(nodes=[node], inputs=[x], outputs=[y], opset=18)
    m = gs.export_onnx(g)
    m.opset_import.append(onnx.helper.make_opsetid("factordeploy", 1))
    onnx.save(m, str(path))
    return path, w


def unknown_op_graph(path: Path) -> Path:
    x = gs.Variable("x", np.float32, ["B", 64])
    y, z = gs.Variable("y", np.float32), gs.Variable("z", np.float32)
    n1 = gs.Node("Relu", "relu0", inputs=[x], outputs=[y])
    n2 = gs.Node("FrobnicateOp", "weird/frob_1", inputs=[y], outputs=[z], domain="acme.custom", attrs={"k": 3})
    m = gs.export_onnx(gs.Graph(nodes=[n1, n2], inputs=[x], outputs=[z], opset=18))
    m.opset_import.append(onnx.helper.make_opsetid("acme.custom", 1))
    onnx.save(m, str(path))
    return path


def mlp_graph(path: Path, seed: int = 0) -> Path:
    """x[B, S, 32] -> MatMul -> Add -> Cast(float) of a mask-like int input -> Mul -> Gelu-ish Erf; fp32."""
    rng = np.random.default_rng(seed)
    x = gs.Variable("x", np.float32, ["B", "S", 32])
    mask = gs.Variable("mask", np.int64, ["B", "S"])
    h1, h2, h3, mf, mu, out = (gs.Variable(n, np.float32) for n in ("h1", "h2", "h3", "mf", "mu", "out"))
    mu3 = gs.Variable("mu3", np.float32)
    nodes = [
        gs.Node("MatMul", "mm", inputs=[x, gs.Constant("w", rng.standard_normal((32, 16)).astype(np.float32) * 0.2)],
                outputs=[h1]),
        gs.Node("Add", "add", inputs=[h1, gs.Constant("b", rng.standard_normal(16).astype(np.float32))], outputs=[h2]),
        gs.Node("Erf", "erf", inputs=[h2], outputs=[h3]),
        gs.Node("Cast", "cast", inputs=[mask], outputs=[mf], attrs={"to": onnx.TensorProto.FLOAT}),
        # (1 - mask) * finfo(float32).min: the additive attention-mask idiom that overflows fp16
        gs.Node("Sub", "inv", inputs=[gs.Constant("one", np.array(1.0, np.float32)), mf], outputs=[mu]),
        gs.Node("Mul", "neg", inputs=[mu, gs.Constant("big", np.array(np.finfo(np.float32).min, np.float32))],
                outputs=[gs.Variable("mneg", np.float32)]),
    ]
    mneg = nodes[-1].outputs[0]
    nodes.append(gs.Node("Unsqueeze", "unsq", inputs=[mneg, gs.Constant("ax", np.array([2], np.int64))], outputs=[mu3]))
    nodes.append(gs.Node("Add", "masked", inputs=[h3, mu3], outputs=[out]))
    m = gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x, mask], outputs=[out], opset=18))
    onnx.save(m, str(path))
    return path


def dense_graph(path: Path, k: int = 512, n: int = 512, seed: int = 0, sparse24: bool = False) -> tuple[Path, np.ndarray]:
    """x[B, S, K] -> MatMul(x, W const [K, N]) -> Relu; W 2:4 along K when `sparse24`. The MatMul is named
    like an annotated factorized layer (fd/l/...), so passes and the builder log treat it as one."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if sparse24:  # keep the 2 largest magnitudes of every group of 4 along K (axis 0)
        g = np.abs(w).reshape(k // 4, 4, n)
        keep = np.argsort(-g, axis=1)[:, :2, :]
        mask = np.zeros_like(g, dtype=bool)
        np.put_along_axis(mask, keep, True, axis=1)
        w = w * mask.reshape(k, n)
    x = gs.Variable("x", np.float32, ["B", "S", k])
    h, y = gs.Variable("h", np.float32), gs.Variable("y", np.float32)
    nodes = [gs.Node("MatMul", "fd/l/layer/MatMul_0", inputs=[x, gs.Constant("w", w)], outputs=[h]),
             gs.Node("Relu", "relu", inputs=[h], outputs=[y])]
    onnx.save(gs.export_onnx(gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=18)), str(path))
    return path, w
