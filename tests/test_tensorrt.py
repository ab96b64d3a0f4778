"""TensorRT / TensorRT-RTX: resolver, parse check, engine builds (ahead-of-time on CPU), plugins, precision.

Needs `tensorrt_rtx_bindings` (CI installs it via scripts/setup.sh); skipped with a reason otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel module is imported

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from factordeploy.engines import trt_module as tm
from factordeploy.errors import UserError

from .trt_graphs import dense_graph, mlp_graph, plugin_graph, unknown_op_graph
from .scaled_matmul_op import registered

SMM = registered()  # the test-only op: its folder + this one registration line is all it takes

HAS_RTX = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt_rtx_bindings not installed "
                               "(pip install tensorrt-rtx-cu13-libs==1.7.1.116 tensorrt-rtx-cu13-bindings==1.7.1.116)")


@pytest.fixture(scope="module")
def rtx():
    if not HAS_RTX:
        pytest.skip("tensorrt_rtx_bindings not installed")
    info = tm.resolve("trt-rtx")
    assert info is not None and info.can_build
    return info


def _small_cfg(out: Path, **kw):
    from factordeploy.engines.tensorrt import Range3, TrtBuildConfig

    return TrtBuildConfig(out_dir=out, batch=Range3(1, 2, 4), seq=Range3(1, 8, 16), **kw)


# ---------------------------------------------------------------- set-up and resolver

@needs_rtx
def test_setup_creates_unversioned_symlink():
    from factordeploy.engines.trt_setup import LINK_NAME, TARGET_NAME, ensure_rtx_symlink, rtx_libs_dir

    ok, msg = ensure_rtx_symlink()
    assert ok, msg
    link = rtx_libs_dir() / LINK_NAME
    assert link.exists() and os.path.realpath(link) == os.path.realpath(rtx_libs_dir() / TARGET_NAME)


def test_missing_tensorrt_is_one_line_error_with_install_command(monkeypatch):
    monkeypatch.setattr(tm, "_import_candidate", lambda name: None)
    assert tm.resolve("any") is None
    with pytest.raises(UserError) as e:
        tm.require("trt")
    msg = e.value.message
    assert "\n" not in msg and "pip install tensorrt" in msg and "--backend trt" in msg
    with pytest.raises(UserError, match="pip install tensorrt-rtx-cu13-libs"):
        tm.require("trt-rtx")
    assert tm.choose_backend("auto").backend == "ort"


def test_cli_backend_trt_without_tensorrt_exits_2_before_any_work(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from factordeploy.cli import main

    monkeypatch.setattr(tm, "_import_candidate", lambda name: None)
    res = CliRunner().invoke(main, ["build", "--model", "minilm", "--backend", "trt", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "pip install" in lines[0]
    assert not (tmp_path / "o").exists()


@needs_rtx
def test_auto_without_runnable_gpu_falls_back_to_ort(rtx):
    c = tm.choose_backend("auto")
    if rtx.can_run:
        assert c.backend in ("trt", "trt-rtx")
    else:
        assert c.backend == "ort" and "trt-rtx" in c.reason and rtx.why_not_run in c.reason
        assert "no CUDA GPU" in rtx.why_not_run or "compute capability" in rtx.why_not_run


def test_rtx_refuses_hopper_with_explanation():
    ok, why = tm._runnable(tm.RTX, "NVIDIA H100", (9, 0))
    assert not ok and "9.0" in why and "8.9" in why
    assert tm._runnable(tm.RTX, "RTX 4090", (8, 9))[0] and tm._runnable(tm.FULL, "NVIDIA H100", (9, 0))[0]


# ---------------------------------------------------------------- parse check

@needs_rtx
def test_unparsable_node_reported_by_name_and_op_type(rtx, tmp_path):
    from factordeploy.engines.tensorrt import check_parsable

    p = unknown_op_graph(tmp_path / "bad.onnx")
    with pytest.raises(UserError) as e:
        check_parsable(p, rtx)
    msg = e.value.message
    assert "weird/frob_1" in msg and "FrobnicateOp" in msg and "\n" not in msg


# ---------------------------------------------------------------- plugin mechanism

def test_shape_rule_matches_torch_reference():
    from factordeploy.ops import IntAlgebra

    spec = SMM
    for xs, ws in (((2, 5, 7), (7, 3)), ((9, 4), (4, 11)), ((1, 2, 3, 8), (8, 1))):
        ref = spec.reference(torch.randn(xs), torch.randn(ws), **spec.attr_values())[0]
        assert spec.output_shapes([list(xs), list(ws)], spec.attr_values(), IntAlgebra())[0] == list(ref.shape)


@pytest.mark.parametrize("relu,dtype", [(0, torch.float32), (1, torch.float32), (1, torch.float16)])
def test_triton_kernel_matches_reference_under_interpreter(relu, dtype):

    spec = SMM
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 40, generator=g).to(dtype)  # M=21, K=40, N=37: none a multiple of the 32 tiles
    w = torch.randn(40, 37, generator=g).to(dtype)
    y = torch.full((3, 7, 37), float("nan"), dtype=dtype)
    attrs = {"alpha": 0.75, "relu": relu}
    launch = spec.launch([x, w], [y], attrs)
    assert launch.grid == (1, 2)
    launch()
    ref = spec.reference(x, w, **attrs)[0]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    if relu:
        assert (y >= 0).all()


@needs_rtx
@pytest.mark.parametrize("np_dtype,name", [(np.float32, "float32"), (np.float16, "float16")])
def test_engine_with_plugin_node_uses_build_time_methods(rtx, tmp_path, np_dtype, name):
    from factordeploy.engines.tensorrt import build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import trt_pipeline
    from factordeploy.plugins.trt_plugin import CALLS, SEEN

    spec = SMM
    src, w = plugin_graph(tmp_path / "p.onnx", alpha=0.5, relu=1, dtype=np_dtype)
    ctx = PassContext(target="trt")
    proto = run_pipeline(onnx.load(str(src)), trt_pipeline(), ctx)
    node = next(n for n in proto.graph.node if n.op_type == "ScaledMatMul")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"factordeploy" and attrs["plugin_version"] == b"1"
    onnx.save(proto, str(tmp_path / "p.trt.onnx"))

    CALLS["ScaledMatMul"].clear()
    SEEN["ScaledMatMul"].clear()
    res = build_engine(tmp_path / "p.trt.onnx", _small_cfg(tmp_path / "eng"), rtx)
    assert res.plugin_layers == 1 and res.engine_bytes > w.nbytes and Path(res.engine_path).exists()
    for m in ("create_plugin", "get_output_shapes", "get_output_data_types", "supports_format_combination",
              "configure_plugin", "get_fields_to_serialize"):
        assert CALLS["ScaledMatMul"][m] >= 1, m
    seen = SEEN["ScaledMatMul"]
    assert seen["attrs"] == {"alpha": 0.5, "relu": 1}  # float + int attributes reached the plugin
    # what TensorRT configured the plugin with == the torch reference on tensors of those shapes and types
    conf = seen["configured"]
    tdt = getattr(torch, name)
    for key in ("min", "opt", "max"):
        x = torch.zeros(conf["inputs"][0][key], dtype=tdt)
        ref = spec.reference(x, torch.from_numpy(w), alpha=0.5, relu=1)[0]
        assert list(conf["outputs"][0][key]) == list(ref.shape)
    assert conf["inputs"][0]["opt"] == (2, 8, 64) and conf["inputs"][1]["opt"] == (64, 48)
    assert [d["type"] for d in conf["inputs"] + conf["outputs"]] == [name] * 3
    assert seen["output_types"] == [str(ref.dtype).replace("torch.", "")]
    assert not res.executed and res.reason
    blob = Path(res.engine_path).read_bytes()  # plugin identity and serialized fields travel in the engine
    assert all(blob.count(t) >= 1 for t in (b"ScaledMatMul", b"factordeploy", b"alpha", b"relu"))


@needs_rtx
def test_same_export_serves_ort_and_trt(rtx, tmp_path):
    """torch module emitting the custom node -> ORT graph (decomposed) matches torch; TRT graph builds."""
    import onnxruntime as ort

    from factordeploy.engines.tensorrt import build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline, trt_pipeline
    from factordeploy.ops.export import emit

    spec = SMM

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 8) * 0.3)
            self.lin = torch.nn.Linear(8, 4)

        def forward(self, x):
            if torch.onnx.is_in_onnx_export():
                h = emit(spec, (x, self.w), {"alpha": 0.25, "relu": 1})
            else:
                h = spec.reference(x, self.w, alpha=0.25, relu=1)[0]
            return self.lin(h)

    torch.manual_seed(0)
    m = M().eval()
    x = torch.randn(2, 3, 16)
    b, s = torch.export.Dim("b", min=1, max=64), torch.export.Dim("s", min=1, max=512)
    prog = torch.onnx.export(m, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                             dynamic_shapes={"x": {0: b, 1: s}}, opset_version=18, verbose=False)
    raw = prog.model_proto
    assert any(n.op_type == "ScaledMatMul" and n.domain == "factordeploy" for n in raw.graph.node)

    ort_proto = run_pipeline(onnx.ModelProto.FromString(raw.SerializeToString()), ort_pipeline(), PassContext())
    assert not any(n.domain == "factordeploy" for n in ort_proto.graph.node)
    onnx.checker.check_model(ort_proto)
    sess = ort.InferenceSession(ort_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 5, 16)
    got = sess.run(None, {"x": x2.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x2).numpy(), atol=1e-5, rtol=1e-5)

    trt_proto = run_pipeline(onnx.ModelProto.FromString(raw.SerializeToString()), trt_pipeline(), PassContext())
    onnx.save(trt_proto, str(tmp_path / "m.trt.onnx"))
    res = build_engine(tmp_path / "m.trt.onnx", _small_cfg(tmp_path), rtx)
    assert res.plugin_layers == 1 and res.network_layers >= 3


# ---------------------------------------------------------------- precision

def test_fp16_pass_keeps_io_fp32_and_matches_fp32_on_ort(tmp_path):
    import onnxruntime as ort

    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.precision import to_precision

    p = mlp_graph(tmp_path / "mlp.onnx")
    m16 = run_pipeline(onnx.load(str(p)), [to_precision("fp16")], PassContext())
    assert all(t.data_type != onnx.TensorProto.FLOAT for t in m16.graph.initializer)
    assert m16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    casts = [n for n in m16.graph.node if n.op_type == "Cast"]
    assert {onnx.helper.get_attribute_value(c.attribute[0]) for c in casts} >= {onnx.TensorProto.FLOAT16}
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((2, 5, 32)).astype(np.float32), "mask": np.ones((2, 5), np.int64)}
    feeds["mask"][1, 3:] = 0
    s32 = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    s16 = ort.InferenceSession(m16.SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = s32.run(None, feeds)[0], s16.run(None, feeds)[0]
    assert b.dtype == np.float32 and not np.isnan(b).any()  # clamped mask constant: no 0 * -inf
    keep = feeds["mask"].astype(bool)
    np.testing.assert_allclose(b[keep], a[keep], atol=1e-2, rtol=1e-2)
    assert (b[~keep] < -6e4).all()  # masked positions stay hugely negative (fp16 max is 65504)


@needs_rtx
def test_reduced_precision_graph_builds(rtx, tmp_path):
    """fp16/bf16 graphs build into engines whose GEMM reads weights and activations in that type
    (TensorRT's own parse log), with the I/O casts added, and the weights stored at half the width."""
    from factordeploy.engines.tensorrt import build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.precision import to_precision

    p, w = dense_graph(tmp_path / "dense.onnx")
    results = {}
    for precision in ("fp32", "fp16", "bf16"):
        m = onnx.load(str(p)) if precision == "fp32" else run_pipeline(onnx.load(str(p)), [to_precision(precision)],
                                                                       PassContext())
        onnx.save(m, str(tmp_path / f"{precision}.onnx"))
        results[precision] = build_engine(tmp_path / f"{precision}.onnx",
                                          _small_cfg(tmp_path / precision, precision=precision), rtx)
    trt_type = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}
    for precision, res in results.items():
        assert res.precision == precision
        line = next(ln for ln in Path(res.log_path).read_text().splitlines()
                    if "fd/l/layer/MatMul_0 [MatMul] inputs:" in ln)
        assert f"[w -> (512, 512)[{trt_type[precision]}]]" in line, line
        if precision != "fp32":
            assert res.network_layers == results["fp32"].network_layers + 2  # input Cast + output Cast
            # 512 x 512 weights at 2 instead of 4 bytes: the engine sheds at least a fifth of their fp32 bytes
            assert results["fp32"].engine_bytes - res.engine_bytes > 0.2 * w.nbytes


@needs_rtx
def test_sparse_weights_flag_reported_honestly(rtx, tmp_path):
    """A graph that really holds a 2:4 weight (declared by its layer, checked by verify-2to4) built with
    --sparse-weights: the flag reaches the builder, and the report says what the log can and cannot show."""
    from factordeploy.engines.tensorrt import build_engine
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import trt_pipeline

    p, w = dense_graph(tmp_path / "s.onnx", sparse24=True)
    assert ((w.reshape(128, 4, 512) != 0).sum(1) <= 2).all()
    ctx = PassContext(layers={"l": {"kind": "layer", "in": 512, "out": 512, "weight_2to4": [512, 512]}}, target="trt")
    onnx.save(run_pipeline(onnx.load(str(p)), trt_pipeline(), ctx), str(tmp_path / "t.onnx"))
    assert ctx.info["verify-2to4"]["layers_checked"] == ctx.info["verify-2to4"]["layers_2to4"] == 1
    res = build_engine(tmp_path / "t.onnx", _small_cfg(tmp_path / "e", sparse_weights=True), rtx)
    log = Path(res.log_path).read_text()
    assert "SPARSE_WEIGHTS" in log and res.sparse_weights  # the flag reached the builder config
    # TensorRT-RTX ahead-of-time builds print no sparsity decisions: the report must say so, not guess
    assert res.sparse_log_lines == [] and "TensorRT-RTX" in res.sparse_note
    off = build_engine(tmp_path / "t.onnx", _small_cfg(tmp_path / "e0"), rtx)
    assert off.sparse_note.startswith("SPARSE_WEIGHTS not requested") and not off.sparse_weights


@needs_rtx
def test_rtx_has_no_qdp_so_ops_use_ipluginv3_creators(rtx):
    from factordeploy.plugins import register_with_tensorrt
    from factordeploy.plugins.qdp import qdp_module, register_qdp

    assert "factordeploy::ScaledMatMul v1" in register_with_tensorrt(rtx.module)

    assert qdp_module(rtx.module) is None and not rtx.has_qdp
    assert register_qdp(rtx.module, SMM) is False
    creator = rtx.module.get_plugin_registry().get_creator("ScaledMatMul", "1", "factordeploy")
    assert creator is not None and [f.name for f in creator.field_names] == ["alpha", "relu"]


def test_type_rules_of_spec():

    spec = SMM
    assert spec.resolve_types(["float16", "float16"]) == ["float16"]
    assert spec.accepts(0, "bfloat16", []) and not spec.accepts(0, "int32", [])
    assert not spec.accepts(1, "float32", ["float16"])  # x and w share the type variable
    assert spec.accepts(2, "float16", ["float16", "float16"]) and not spec.accepts(2, "float32", ["float16", "float16"])
    assert spec.attr_values({"alpha": np.array([2.0], np.float32), "relu": np.array([1], np.int32)}) == {"alpha": 2.0, "relu": 1}


def test_ort_backend_stage_and_report_section(tmp_path):
    from factordeploy.build import BuildConfig, check_engine_config
    from factordeploy.report import render_engine
    from factordeploy.stages import BuildState, tensorrt

    state = BuildState(BuildConfig(backend="ort"), tmp_path)
    tensorrt(state)
    e = state.report.engine
    assert e.backend == "ort" and e.requested == "ort" and state.artifacts == {} and not e.executed
    report = e.as_dict()
    assert report["executed"] is False and "note" not in report
    md = "\n".join(render_engine(report))
    assert "## Engine backend" in md and "**ort**" in md and "model.onnx" in md
    with pytest.raises(UserError, match="apply to TensorRT engines"):
        check_engine_config(BuildConfig(backend="ort", precision="fp16"))
    with pytest.raises(UserError, match="min:opt:max"):
        check_engine_config(BuildConfig(backend="ort", trt_batch="8"))
    with pytest.raises(UserError, match="min <= opt <= max"):
        check_engine_config(BuildConfig(backend="ort", trt_seq="1:512:128"))


def test_cli_rejects_engine_flags_with_ort_backend(tmp_path):
    from click.testing import CliRunner

    from factordeploy.cli import main

    res = CliRunner().invoke(main, ["build", "--backend", "ort", "--precision", "fp16", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "apply to TensorRT engines" in res.output
    res = CliRunner().invoke(main, ["build", "--backend", "ort", "--batch", "4:2:8", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--batch" in res.output
