"""Weight-only quantization of stored factors and quant-lowrank (issue 20).

References: ONNX Runtime's own C++ block quantizer (the codes the anchor stores), the fp32 factors,
the bytes ONNX Runtime reads from the file, plain quantization of the same layer at the same bytes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from factordeploy.cli import main
from factordeploy.compress.layers import (ChannelSparseLowRankLinear, DenseLinear, DenseSparseLinear, LowRankLinear,
                                          QuantEmbedding, QuantLowRankLinear, Sparse24Linear, SparsePlusLowRankLinear,
                                          project_24)
from factordeploy.compress.linalg import gram_factor
from factordeploy.compress.methods.quant_lowrank import fit_layer, lowrank_bytes, output_err
from factordeploy.compress.quant import QuantizedMatrix, QuantSpec, quant_bytes, quantize_rtn
from factordeploy.passes.pipeline import PassContext, run_pipeline
from factordeploy.passes.presets import ort_pipeline

from .layer_export import export_layer


# ---------------------------------------------------------------- the quantizer vs ONNX Runtime's own

def _ort_codes(W: np.ndarray, bits: int, block: int, sym: bool):
    """ONNX Runtime's C++ quantize_matmul_{2,4,8}bits (what MatMulNBitsQuantizer calls), unpacked to K x N."""
    from onnxruntime.capi import _pybind_state as C

    K, N = W.shape
    kb, per = -(-K // block), 8 // bits
    packed = np.zeros((N, kb, block * bits // 8), np.uint8)
    zp = np.zeros((N, (kb * bits + 7) // 8), np.uint8)
    sc = np.zeros((N, kb), np.float32)
    getattr(C, f"quantize_matmul_{bits}bits")(packed, W, sc, zp, block, N, K, sym)
    codes = np.zeros((N, kb * block), np.uint8)
    for j in range(per):
        codes[:, j::per] = (packed.reshape(N, -1) >> (bits * j)) & ((1 << bits) - 1)
    zz = np.zeros((N, kb * per), np.uint8)
    for j in range(per):
        zz[:, j::per][:, : zp.shape[1]] = (zp >> (bits * j)) & ((1 << bits) - 1)
    return codes[:, :K].T, sc.T, zz[:, :kb].T


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("K", [96, 100])
def test_rtn_codes_equal_onnxruntime_quantizer(bits, sym, K):
    rng = np.random.default_rng(bits * 7 + K)
    W = (rng.standard_normal((K, 40)) * rng.random((1, 40))).astype(np.float32)
    codes, scales, zeros = _ort_codes(W, bits, 32, sym)
    q, s, z = quantize_rtn(torch.from_numpy(W), QuantSpec(bits, 32, sym))
    assert (q.numpy() == codes).all()
    np.testing.assert_allclose(s.numpy(), scales, rtol=1e-6, atol=0)
    if not sym:
        assert (z.numpy() == zeros).all()


@pytest.mark.parametrize("grid", ["signed", "positive"])
@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_at_most_one_step(grid, bits):
    torch.manual_seed(0)
    W = torch.randn(64, 24)
    m = QuantizedMatrix.from_weight(W.T, QuantSpec(bits, 16, True, "rtn", grid))
    err = (m.weight() - W.T).abs()  # weight() is out x in (F.linear layout): here 24 x 64, K = 64
    step = m.scale.abs().repeat_interleave(16, 0)[:64].T
    # round-to-nearest moves an entry by half a step; the value a grid clamps (ORT's signed grid puts the
    # block's signed extreme on code 0, so the other side tops out at 2^(b-1) - 1) by at most one step
    assert bool((err <= step + 1e-6).all())
    assert float((err / step).mean()) < 0.3
    if grid == "positive":
        assert bool((m.scale > 0).all())


def test_bytes_follow_matmulnbits_layout():
    # K = 100 -> 4 blocks of 32; N = 8 columns: 4-bit codes 8 * 4 * 16 B, fp32 scales 8 * 4 * 4 B
    assert quant_bytes(100, 8, QuantSpec(4, 32, True)) == 8 * 4 * 16 + 8 * 4 * 4
    # asymmetric adds packed zero points: 4 blocks x 4 bits = 2 bytes per column
    assert quant_bytes(100, 8, QuantSpec(4, 32, False)) == 8 * 4 * 16 + 8 * 4 * 4 + 8 * 2
    assert quant_bytes(64, 8, QuantSpec(8, 32, True)) == 8 * 64 + 8 * 2 * 4


# ---------------------------------------------------------------- every layer kind

def _layers() -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)
    i, o, r = 96, 64, 16
    A, B, b = torch.randn(r, i) * 0.2, torch.randn(o, r) * 0.2, torch.randn(o) * 0.1
    idx = torch.sort(torch.randperm(i * o)[:200]).values
    return {
        "lowrank": LowRankLinear(A, B, b),
        "dense": DenseLinear(torch.randn(o, i) * 0.1, b),
        "sparse24": Sparse24Linear(project_24(torch.randn(o, i) * 0.1), b),
        "dense_sparse": DenseSparseLinear(torch.randn(o, 32) * 0.2, project_24(torch.randn(32, i) * 0.2), b),
        "sparse_lowrank": SparsePlusLowRankLinear(A, B, idx, torch.randn(200) * 0.1, b),
        "channel_lowrank": ChannelSparseLowRankLinear(A, B, torch.arange(0, i, 3), torch.randn(o, i // 3) * 0.1, b),
        "quant_lowrank": QuantLowRankLinear(QuantizedMatrix.from_weight(torch.randn(o, i) * 0.1, QuantSpec(4, 32)), A, B, b),
    }


def _nbits_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of every initializer that a MatMulNBits node reads as weight, scales or zero points."""
    inits = {t.name: t for t in proto.graph.initializer}
    names = {n for node in proto.graph.node if node.op_type == "MatMulNBits" for n in node.input[1:4] if n in inits}
    return sum(numpy_helper.to_array(inits[n]).nbytes for n in names)


@pytest.mark.parametrize("kind", list(_layers()))
@pytest.mark.parametrize("bits", [4, 8])
def test_each_layer_kind_quantizes_exports_and_counts_bytes(kind, bits, tmp_path):
    import onnxruntime as ort

    layer = _layers()[kind].eval()
    fp = {n: getattr(layer, n).detach().clone() for n in layer.matmul_factors}
    spec = QuantSpec(bits, 32, True)
    done = layer.quantize_factors_(spec)
    # every factor with K >= a block is quantized (a rank-16 B has K = 16 < 32 and stays fp32)
    expect = [n for n, W in fp.items() if QuantizedMatrix.saves_bytes(W, spec) and n not in ("W",)]
    assert sorted(done) == sorted(expect)
    for n in done:  # dequantized within one step of the fp32 factor (half a step but for the clamped extreme)
        q = layer.quant[n]
        step = q.scale.abs().repeat_interleave(32, 0)[: q.K].T
        err = (getattr(layer, n) - fp[n]).abs()
        assert bool((err <= step + 1e-6).all()) and float((err / step).mean()) < 0.3, n
    proto = run_pipeline(export_layer(layer), ort_pipeline(), PassContext(layers={"l": layer.describe()}))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(layer.quantized())
    # stored bytes of the quantized factors == bytes ONNX Runtime reads from the file
    assert _nbits_bytes(proto) == sum(layer.factor_bytes(n) for n in layer.quantized())
    # ORT (accuracy_level 0: fp32 arithmetic on the stored codes) computes what torch computes
    for node in nbits:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        ref = torch.relu(layer(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x.numpy()})[0], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding_rows_and_export(bits, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(0)
    W = torch.randn(50, 64)
    e = QuantEmbedding(W, bits=bits, block=32)
    if bits == 8:  # one scale per row, half a step
        step = (W.abs().amax(1, keepdim=True) / 127).expand_as(W)
        assert bool(((e.weight - W).abs() <= 0.5 * step + 1e-7).all())
        assert e.stored_bytes() == 50 * 64 + 50 * 4
    else:  # ONNX Runtime's 4-bit grid per block of 32 along each row (its codes, see the RTN test)
        ref = QuantizedMatrix.from_weight(W, QuantSpec(4, 32, True)).weight()
        torch.testing.assert_close(e.weight, ref, rtol=0, atol=1e-7)
        assert e.stored_bytes() == 50 * 64 // 2 + 50 * 2 * 4

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = e

        def forward(self, ids):
            return self.e(ids)

    ids = torch.tensor([[1, 7, 49], [0, 3, 3]])
    prog = torch.onnx.export(M().eval(), (ids,), dynamo=True, input_names=["ids"], output_names=["y"], opset_version=18)
    proto = run_pipeline(prog.model_proto, ort_pipeline(), PassContext())
    ops = [n.op_type for n in proto.graph.node]
    assert "DequantizeLinear" not in ops  # only the looked-up rows are dequantized
    assert (ops.count("Gather") == 2) if bits == 8 else (ops == ["GatherBlockQuantized"])
    inits = {t.name: t for t in proto.graph.initializer}
    want = onnx.TensorProto.INT8 if bits == 8 else onnx.TensorProto.INT4
    assert any(t.data_type == want and list(t.dims) == [50, 64] for t in inits.values())
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, e(ids).numpy(), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- quant-lowrank never loses to plain quantization

def _random_layer(seed: int):
    g = torch.Generator().manual_seed(seed)
    o, i = [(64, 96), (96, 64), (128, 128)][seed % 3]
    W = torch.randn(o, i, generator=g) * (torch.rand(1, i, generator=g) + 0.2)
    X = torch.randn(256, i, generator=g) * torch.linspace(0.1, 3, i)  # anisotropic activations
    return W, (X.T @ X).double()


@pytest.mark.parametrize("seed", range(6))
def test_quant_lowrank_output_error_never_worse_than_plain_at_same_bytes(seed):
    """The method's candidate set includes plain quantization at the finest block within the same bytes, and
    the alternating fit starts from plain quantization of W, so its best round can only improve on it."""
    from factordeploy.compress.base import CompressContext, get_method

    W, G = _random_layer(seed)
    L = gram_factor(G)
    spec = QuantSpec(4, 32, True)
    lr = QuantSpec(8, 32, True)
    Q, A, B, errs = fit_layer(W, G, spec, rank=8, rounds=4, lr_spec=lr)
    plain_same_block = QuantizedMatrix.from_weight(W, spec).weight()
    assert errs[0] <= output_err(W, plain_same_block, L) + 1e-9  # round 1 is RTN(W) + a fitted correction
    # the method as a whole, against plain quantization at the finest block that fits its bytes
    model = torch.nn.Sequential(torch.nn.Linear(W.shape[1], W.shape[0], bias=False))
    model[0].weight.data.copy_(W)

    class Calib:
        def grams(self, _model, names):
            return {n: G for n in names}

    ctx = CompressContext(ratio=0.0, options={"bits": 4, "rank": 8, "lowrank_bytes": 0.0, "lowrank_bits": 8, "rounds": 4},
                          calibration=Calib())
    get_method("quant-lowrank").compress(model, ["0"], ctx)
    new = model[0]
    from factordeploy.compress.quantize import apply_pending

    apply_pending(model)
    total = new.stored_bytes()
    best_plain = min(output_err(W, QuantizedMatrix.from_weight(W, QuantSpec(4, blk, True)).weight(), L)
                     for blk in (16, 32, 64, 128, 256) if quant_bytes(W.shape[1], W.shape[0], QuantSpec(4, blk, True)) <= total)
    assert output_err(W, new.dense_weight().detach(), L) <= best_plain * (1 + 1e-6)


# ---------------------------------------------------------------- builds, engines, generate, bad values

@pytest.fixture(scope="module")
def w4_build(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w4") / "tiny-w4"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_llama_dir), "--method", "svd", "--ratio", "0.5",
                                  "--quantize", "w4", "--quantize-head", "--embedding-bits", "4", "--out", str(out), "--no-baseline",
                                  "--backend", "ort", "--quiet"])
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "report.json").read_text())


def test_w4_build_stores_codes_counts_bytes_and_generates(w4_build):
    out, rep = w4_build
    q = rep["quantize"]
    assert q["spec"]["bits"] == 4 and q["head"] and q["embedding"]["bytes_after"] < 0.3 * q["embedding"]["bytes_before"]
    assert rep["fidelity"]["passed"] and q["fidelity"]["passed"]
    proto = onnx.load(str(out / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) >= 2 * 7 * 2  # both factors of every low-rank layer of 2 blocks (+ the head)
    # the report's bytes are the file's: quantized factors, head and the int8 table
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    gbq = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gbq) == 1 and q["embedding"]["form"] == "w4g32"
    t4 = next(t for t in proto.graph.initializer if t.name == gbq[0].input[0])  # INT4: two codes per byte
    assert len(t4.raw_data) == t4.dims[0] * t4.dims[1] // 2
    assert len(t4.raw_data) + inits[gbq[0].input[2]].nbytes == q["embedding"]["bytes_after"]
    # the whole file is the stored bytes the report counts, plus graph structure (< 2%)
    size = (out / "model.onnx").stat().st_size
    assert rep["size"]["bytes_after"] <= size <= 1.02 * rep["size"]["bytes_after"], (size, rep["size"]["bytes_after"])
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt", "The city", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("extra", [["--method", "svd", "--ratio", "0.5", "--quantize", "w4"],
                                   ["--method", "quant-lowrank", "--bits", "4"]])
def test_trt_rtx_engine_builds_from_quantized_graph(extra, tiny_llama_dir, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    out = tmp_path / "rtx"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_llama_dir), *extra, "--out", str(out), "--no-baseline",
                                  "--no-eval", "--backend", "trt-rtx", "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["engine"]["engine_bytes"] > 0 and rep["engine"]["backend"] == "trt-rtx"
    trt = onnx.load(str(out / "model.trt.onnx"))
    inits = {t.name: t.data_type for t in trt.graph.initializer}
    codes = [inits[n.input[0]] for n in trt.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(codes) >= 2 * 7  # a DequantizeLinear per quantized factor of 2 blocks x 7 linears
    assert onnx.TensorProto.INT4 in codes and set(codes) <= {onnx.TensorProto.INT4, onnx.TensorProto.INT8}
    assert not any(n.op_type == "MatMulNBits" for n in trt.graph.node)


@pytest.mark.parametrize("args,needle", [
    (["--method", "svd", "--quantize", "w3"], "--quantize"),
    (["--method", "svd", "--quantize", "w4", "--quant-block", "48"], "--quant-block"),
    (["--method", "svd", "--quantize", "w2", "--backend", "trt-rtx"], "TensorRT"),
    (["--method", "svd", "--quantize", "w4", "--quant-asym", "--backend", "trt-rtx"], "symmetric"),
    (["--method", "quant-lowrank", "--bits", "3"], "--bits"),
    (["--method", "quant-lowrank", "--rank", "100000"], "--rank"),
    (["--method", "svd", "--quant-algo", "gptq"], "--quant-algo"),
    (["--method", "svd", "--quantize", "w4", "--embedding-bits", "4"], "--quantize-head"),
])
def test_bad_quantization_values_are_one_line_errors(args, needle, tiny_llama_dir, tmp_path):
    out = tmp_path / "never"
    r = CliRunner().invoke(main, ["build", "--model", str(tiny_llama_dir), *args, "--out", str(out), "--no-baseline",
                                  "--quiet"], catch_exceptions=False)
    assert r.exit_code == 2, r.output
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in r.output, r.stderr
    assert not out.exists()
