"""The build's typed `Report`, written as report.json (everything) and report.md (headline figures).

report.json keeps the keys of version 1 and adds `report_version` (2): fidelity, the TensorRT graph
check and the engine comparison are one `verify.compare.Comparison` each (adding reference_max_abs,
nan and runners), the custom-op lowering is the generic `lower-custom-ops` pass entry, and layer
entries carry their graph facts (`custom_op`, `weight_2to4`). `render_markdown` reads the JSON form,
so a saved report.json can be re-rendered.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .engines.tensorrt import EngineResult
from .verify.compare import Comparison

REPORT_VERSION = 2


@dataclass
class SizeReport:
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    targeted_layers: int
    factorized_layers: int
    targeted_bytes_before: int
    targeted_bytes_after: int
    targeted_reduction: float


@dataclass
class FidelityReport(Comparison):
    """The export check (torch vs model.onnx) and the input shapes it ran on."""

    feeds: list[dict[str, list[int]]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return super().as_dict() | {"feeds": self.feeds}


@dataclass
class LatencyReport:
    engine: str
    providers: list[str]
    points: list[dict[str, Any]]


@dataclass
class EngineReport:
    """The TensorRT stage: which backend and why; for TensorRT the graph passes, the engine build
    (`EngineResult`, artifact paths as file names) and, where the engine could not run, the fp16
    TensorRT graph checked on ONNX Runtime. JSON: the version-1 flat layout (result fields inlined)."""

    requested: str
    backend: str
    reason: str
    precision: str
    note: str | None = None
    tensorrt: dict[str, Any] | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    result: EngineResult | None = None
    trt_graph_on_ort: Comparison | None = None

    @property
    def executed(self) -> bool:
        return self.result is not None and self.result.executed

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"requested": self.requested, "backend": self.backend, "reason": self.reason,
                             "precision": self.precision}
        if self.result is None:
            d["executed"] = False
            if self.note:
                d["note"] = self.note
            return d
        d |= {"tensorrt": self.tensorrt, "passes": self.passes}
        if self.trt_graph_on_ort is not None:
            d["trt_graph_on_ort"] = self.trt_graph_on_ort.as_dict()
        return d | self.result.as_dict()


@dataclass
class Report:
    """Everything a build measured; build stages fill it in, `to_dict` is report.json."""

    model: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    size: SizeReport | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    attention: dict[str, Any] = field(default_factory=dict)  # --attention: kind, block, max_len, layers, kv_cache
    recovery: dict[str, Any] | None = None  # --recover-steps: adapter, data, losses, eval curve, memory, time
    export: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    fidelity: FidelityReport | None = None
    quantize: dict[str, Any] | None = None  # --quantize int8: the int8 artifact, its check (absent otherwise)
    quality: dict[str, Any] = field(default_factory=dict)
    latency: LatencyReport | None = None
    engine: EngineReport | None = None
    serving: dict[str, Any] | None = None  # files for other stacks, the ORT-optimized graph decision (serve/)
    artifacts: dict[str, str] = field(default_factory=dict)
    sizes_on_disk: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    baseline_export_cached: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    factordeploy_version: str = __version__
    report_version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"report_version": self.report_version, "factordeploy_version": self.factordeploy_version}
        for f in fields(self):
            if f.name in out or (f.name == "quantize" and self.quantize is None):
                continue
            v = getattr(self, f.name)
            out[f.name] = (v.as_dict() if isinstance(v, (Comparison, EngineReport))
                           else asdict(v) if hasattr(v, "__dataclass_fields__") else v)
        return out


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# The default bar a build is held to in the report's first lines (held-out evaluation split, vs the
# original): what a user would still ship - near-identical embeddings, or at most a quarter more perplexity.
QUALITY_BAR = {"encoder": 0.95, "decoder": 1.25}


def quality_verdict(kind: str, quality: dict | None) -> str:
    """One line: whether the compressed model meets QUALITY_BAR, with the figure (or why it is not known)."""
    comp, orig = (quality or {}).get("compressed"), (quality or {}).get("original") or {}
    if not comp:
        return "quality bar: not measured (the build ran with --no-eval)"
    if kind == "encoder":
        v, bar = comp["embedding_cosine_mean"], QUALITY_BAR["encoder"]
        return (f"quality bar: {'MET' if v >= bar else 'NOT MET'} - mean embedding cosine to the original {v:.4f} "
                f"{'>=' if v >= bar else '<'} {bar} on the held-out evaluation split")
    v, bar = comp["perplexity"] / orig["perplexity"], QUALITY_BAR["decoder"]
    return (f"quality bar: {'MET' if v <= bar else 'NOT MET'} - perplexity {v:.3f}x the original's "
            f"({comp['perplexity']:.2f} vs {orig['perplexity']:.2f}) {'<=' if v <= bar else '>'} {bar}x on the held-out evaluation split")


def render_markdown(r: dict) -> str:
    s, q = r["size"], r.get("quality") or {}
    verdict = quality_verdict(r["model"]["kind"], q)
    lines = [
        f"# factordeploy report: {r['model']['name']} / {r['method']['name']} ("
        + (f"budget {r['method']['options']['budget']}" if "budget" in (r["method"].get("options") or {})
           else f"ratio {r['method']['ratio']}") + ")",
        "",
        f"**{verdict[0].upper() + verdict[1:]}.** Targeted bytes {s['targeted_reduction'] * -100:+.1f}%, export check "
        f"{'passed' if r['fidelity']['passed'] else 'FAILED'}.",
        "",
        f"Model: `{r['model']['name']}` ({r['model']['kind']}), source `{r['model']['source']}`.  ",
        f"Method: `{r['method']['name']}` - {r['method']['summary']}.  ",
    ]
    for note in r["method"].get("notes", []):
        lines.append(f"Note: {note}.  ")
    if r.get("calibration"):
        c = r["calibration"]
        lines.append(f"Calibration: {c['n']} x {c['length']} tokens, seed {c['seed']}, from {c['source']}.  ")
    lines += render_recovery(r.get("recovery"), q)
    lines += [
        "",
        "## Size",
        "| | before | after |",
        "|---|---:|---:|",
        f"| parameters (whole model) | {s['params_before']:,} | {s['params_after']:,} |",
        f"| weight bytes (whole model) | {_mb(s['bytes_before'])} | {_mb(s['bytes_after'])} |",
        f"| targeted layers' bytes ({s['targeted_layers']} layers, {s['factorized_layers']} factorized) "
        f"| {_mb(s['targeted_bytes_before'])} | {_mb(s['targeted_bytes_after'])} |",
        "",
        f"Targeted-byte reduction: **{s['targeted_reduction'] * 100:.1f}%**.",
        "",
    ]
    f = r["fidelity"]
    lines += [
        "## Export check (polygraphy: compressed torch vs model.onnx on ONNX Runtime, real text)",
        f"**{'PASSED' if f['passed'] else 'FAILED'}** - max abs error {f['max_abs']:.3g}, max rel error {f['max_rel']:.3g}, "
        f"mean abs {f['mean_abs']:.3g}; tolerance atol {f['atol']} + rtol {f['rtol']}, {f['iterations']} inputs "
        f"({', '.join(str(x['input_ids']) for x in f['feeds'])}).",
        f"onnx.checker: {r['export']['checker']}; shape inference: {r['export']['shape_inference']}; opset {r['export']['opset']}.",
        "",
    ]
    qz = r.get("quantize")
    if qz and "spec" not in qz and qz.get("fidelity"):  # a method's own quantized factors (quant-lowrank)
        qf = qz["fidelity"]
        lines += [f"## Quantized factors ({qz.get('note', '')})",
                  f"Deployed model.onnx (MatMulNBits accuracy_level 4: int8 activations) vs torch: "
                  f"**{'PASSED' if qf['passed'] else 'FAILED'}** - mean abs {qf['mean_abs']:.3g} <= {qf['atol']}.", ""]
    elif qz and qz.get("mode") != "int8":
        sp = qz["spec"]
        qf = qz.get("fidelity")
        lines += [f"## Weight-only quantization ({qz['mode']}: {sp['bits']}-bit codes, block {sp['block']}, "
                  f"{'symmetric' if sp['symmetric'] else 'asymmetric'}, {sp['algo']}, {sp['grid']} grid)",
                  f"Every stored factor of {qz['layers_quantized']} block linears"
                  + (f" and the LM head ({qz['head']})" if qz.get("head") else "")
                  + f" is block-quantized: {_mb(qz['bytes_before'])} -> {_mb(qz['bytes_after'])} (codes, fp32 scales"
                  + ("" if sp["symmetric"] else ", zero points") + " counted)."
                  + (f" Kept in fp32 (no per-factor MatMul): {', '.join(qz['kept_fp32'])}." if qz["kept_fp32"] else "")
                  + (f" Token-embedding table ({qz['embedding']['name']}): {qz['embedding']['form']}, {_mb(qz['embedding']['bytes_before'])}"
                     f" -> {_mb(qz['embedding']['bytes_after'])}." if qz.get("embedding") else ""),
                  "The export check above ran model.onnx at MatMulNBits accuracy_level 0 (fp32 arithmetic on the stored codes)."]
        if qf:
            lines.append(f"Deployed model.onnx (accuracy_level 4: int8 activations, the fast CPU kernel) vs torch: "
                         f"**{'PASSED' if qf['passed'] else 'FAILED'}** - mean abs {qf['mean_abs']:.3g} <= {qf['atol']} "
                         f"(max abs {qf['max_abs']:.3g}).")
        lines.append("")
    elif qz:
        qf = qz["fidelity"]
        lines += ["## int8 artifact (onnxruntime dynamic quantization)",
                  f"model.onnx is int8: {_mb(qz['bytes_before'])} -> {_mb(qz['bytes_after'])} "
                  f"({qz['matmuls_quantized']} of {qz['matmuls_total']} constant-weight MatMuls int8). Check vs the fp32 "
                  f"torch model: **{'PASSED' if qf['passed'] else 'FAILED'}** - mean abs {qf['mean_abs']:.3g} <= {qf['atol']} "
                  f"(max abs {qf['max_abs']:.3g}, not bounded: int8 rounding).", ""]
    if q:
        art = q.get("artifact_int8")
        lines += ["## Quality on held-out text (vs the original model)",
                  "| metric | original | compressed |" + (" int8 artifact |" if art else ""),
                  "|---|---:|---:|" + ("---:|" if art else "")]
        comp, orig = q["compressed"], q["original"]
        if "perplexity" in comp:
            lines.append(f"| perplexity ({comp['windows']} x {comp['window_len']} tokens) | {orig['perplexity']:.3f} | {comp['perplexity']:.3f} |"
                         + (f" {art['perplexity']:.3f} |" if art else ""))
        else:
            lines.append(f"| mean embedding cosine vs original ({comp['eval_sentences']} sentences) | 1.0 | {comp['embedding_cosine_mean']:.4f} |"
                         + (f" {art['embedding_cosine_mean']:.4f} |" if art else ""))
            lines.append(f"| polarity probe accuracy (LOO nearest centroid, 200 sentences) | {orig['polarity_accuracy']:.3f} | {comp['polarity_accuracy']:.3f} |"
                         + (f" {art['polarity_accuracy']:.3f} |" if art else ""))
        lines.append("")
    lat = r["latency"]
    lines += [f"## Latency ({lat['engine']}, {', '.join(lat['providers'])}; median of runs)",
              "| batch x seq | original ms | compressed ms | speedup | runs |", "|---|---:|---:|---:|---:|"]
    for p in lat["points"]:
        o = p.get("original", {}).get("median_ms", float("nan"))
        lines.append(f"| {p['batch']} x {p['seq']} | {o:.2f} | {p['compressed']['median_ms']:.2f} | {p.get('speedup', float('nan')):.2f}x | {p['compressed']['runs']} |")
    lines += render_engine(r.get("engine"))
    lines += render_serving(r.get("serving"))
    lines += ["", "## Layers", "| layer | before | after | bytes before | bytes after |", "|---|---|---|---:|---:|"]
    for lay in r["layers"]:
        after = ", ".join(f"{k}={v}" for k, v in lay["after"].items() if k not in ("in", "out"))
        lines.append(f"| {lay['name']} | {lay['before']['out']}x{lay['before']['in']} | {after} | {lay['bytes_before']:,} | {lay['bytes_after']:,} |")
    lines += ["", "## Passes", "| pass | nodes before | nodes after | s |", "|---|---:|---:|---:|"]
    for p in r["passes"]:
        lines.append(f"| {p['pass']} | {p['nodes_before']} | {p['nodes_after']} | {p['seconds']} |")
    lines += pass_notes(r["passes"])
    lines += ["", "## Artifacts", "| artifact | path | size |", "|---|---|---:|"]
    for k, v in r["artifacts"].items():
        lines.append(f"| {k} | `{v}` | {_mb(r['sizes_on_disk'][k])} |")
    lines += ["", "## Wall time per stage (s)", "| stage | s |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in r["timings_s"].items()]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), ""]
    return "\n".join(lines)


def render_recovery(rec: dict | None, q: dict) -> list[str]:
    """The recovery stage in one paragraph: adapter, data, steps, losses, held-out curve, memory, time."""
    if not rec:
        return []
    t, a, c = rec["train"], rec["adapter"], rec["config"]
    curve = ", ".join(f"{s}: {v:.4g}" for s, v in t["eval_curve"])
    out = ["", "## Recovery (distillation from the original)",
           f"Adapter `{a['adapter']}`" + (f" rank {a['rank']}" if a.get("rank") else "") +
           f" on {a['factors']} factors ({a['trainable_params']:,} trainable params), merged before export "
           f"(layer kinds and stored bytes unchanged: {rec['bytes_unchanged']}).  ",
           f"Data: {rec['data']}; {t['steps']} steps x {c['batch']} windows of {c['seq_len']} tokens, lr {c['lr']:g}.  ",
           f"Training loss {t.get('loss_first', float('nan')):.4g} -> {t.get('loss_last', float('nan')):.4g}; held-out "
           f"(pydoc selection split) {curve}; kept step {t['best_step']}.  ",
           f"Time {rec['seconds']:.0f} s ({t['tokens_per_s']:.0f} tokens/s), teacher outputs {rec['teacher_seconds']:.0f} s, "
           f"peak memory {t['peak_memory_bytes'] / 2 ** 20:.0f} MiB ({t['peak_memory_kind']}).  "]
    if q.get("compressed_before_recovery") and q.get("compressed"):
        b, f = q["compressed_before_recovery"], q["compressed"]
        keys = [k for k in ("perplexity", "embedding_cosine_mean", "polarity_accuracy") if k in b and k in f]
        out.append("Quality before -> after recovery: " + ", ".join(f"{k} {b[k]:g} -> {f[k]:g}" for k in keys) + ".  ")
    return out


def pass_notes(passes: list[dict]) -> list[str]:
    """Pass decisions that change what the artifact is (not just how it was made): custom-op lowerings."""
    out = []
    for p in passes:
        if p["pass"] != "lower-custom-ops":
            continue
        for op, d in (p.get("ops") or {}).items():
            flag = f"--{d['flag']} {d['policy']}" if d.get("flag") else f"policy {d['policy']}"
            counts = ", ".join(f"{d[h]} {h}" for h in d if h not in ("policy", "flag", "layers", "refolding", "per_layer"))
            out += ["", f"ONNX Runtime lowering of {d['layers']} {op} layers (`{flag}`): {counts}."]
            refolded = [h for h in d.get("refolding", []) if d.get(h)]
            if refolded:
                out[-1] += (f" A layer lowered as {'/'.join(refolded)} stores its dense W again in model.onnx, so "
                            "model.onnx saves no bytes on it (chosen because it is faster on this runtime); the "
                            "op's standard-op body keeps the compressed form, and the TensorRT graph always does.")
    return out


def render_serving(sv: dict | None) -> list[str]:
    """## Serving files: what other stacks read from this folder, and the ORT-optimized graph decision."""
    if not sv:
        return []
    h, o = sv["hf_files"], sv["ort_optimized"]
    return ["", "## Serving files",
            f"For Hugging Face / Optimum (`ORTModel*.from_pretrained(folder)`): {', '.join(f'`{f}`' for f in h['files'])} "
            f"(tokenizer class `{h['tokenizer_class']}`"
            + (f"; flat keys for older readers: {', '.join(h['flat_keys_added'])}" if h["flat_keys_added"] else "") + ").  ",
            f"`model.ort-optimized.onnx`: {o['reason']}."]


def render_engine(e: dict | None) -> list[str]:
    """## Engine: which backend, why, and the TensorRT build figures when an engine was built."""
    if not e:
        return []
    lines = ["", "## Engine backend", f"Backend: **{e['backend']}** (requested `{e['requested']}`): {e['reason']}.  "]
    if e["backend"] == "ort":
        lines.append("No TensorRT engine was built; `model.onnx` (ONNX Runtime) is the deployable artifact."
                     + (f" Note: {e['note']}." if e.get("note") else ""))
        return lines
    t = e.get("tensorrt", {})
    lines += [
        f"{'TensorRT' if e['backend'] == 'trt' else 'TensorRT-RTX'} {e.get('trt_version', t.get('version', '?'))}, "
        f"precision {e['precision']} (in the graph: `{e.get('onnx_path', 'model.trt.onnx')}`), "
        f"SPARSE_WEIGHTS {'on' if e.get('sparse_weights') else 'off'}.",
        "",
        "| engine | value |", "|---|---:|",
        f"| engine file | `{e['engine_path']}` |",
        f"| engine size | {_mb(e['engine_bytes'])} |",
        f"| build time (s) | {e['build_seconds']:.2f} |",
        f"| layers ({e['layer_source']}) | {e['layers']} |",
        f"| engine layers by type | {', '.join(f'{k} {v}' for k, v in sorted(e.get('layer_types', {}).items()))} |",
        f"| gemm layers of factorized layers (named fd/...) | {e.get('factorized_gemm_layers', 0)} |",
        f"| network layers after parsing / plugin layers | {e['network_layers']} / {e['plugin_layers']} |",
        f"| builder log | `{e['log_path']}` |",
        f"| timing cache | {('`' + e['timing_cache'] + '`') if e.get('timing_cache') else 'none (no-op in TensorRT-RTX)'} |",
        "",
        "Profile (min / opt / max): " + "; ".join(f"`{k}` {v['min']} / {v['opt']} / {v['max']}"
                                                 for k, v in e.get("profile", {}).items()) + ".  ",
        f"Sparse weights: {len(e['sparse_log_lines'])} sparsity line(s) in the log - {e['sparse_note']}.  ",
        f"Executed: **{'yes' if e['executed'] else 'no'}** - {e['reason']}.",
    ]
    g = e.get("trt_graph_on_ort")
    if g:
        lines.append(f"fp16 TensorRT graph run by ONNX Runtime vs model.onnx ({g['iterations']} real-text inputs; checks the "
                     f"precision pass, not TensorRT): max abs {g['max_abs']:.3g}, mean abs {g['mean_abs']:.3g} "
                     f"(outputs up to {g['reference_max_abs']:.3g}).")
    c = e.get("comparison")
    if c:
        lines.append(f"TensorRT vs ONNX Runtime (polygraphy): **{'PASSED' if c['passed'] else 'FAILED'}** "
                     f"(atol {c['atol']}, rtol {c['rtol']}, {c['iterations']} inputs).")
    return lines


def write_report(report: Report, folder: Path) -> None:
    data = report.to_dict()
    (folder / "report.json").write_text(json.dumps(data, indent=2, default=str))
    (folder / "report.md").write_text(render_markdown(data))
