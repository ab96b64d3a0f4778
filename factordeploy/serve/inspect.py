"""`deploy inspect DIR`: what one build folder holds - model, method, layers (kinds, ranks, bytes),
files on disk, and the checks the build ran - plus a consistency check that the graph still has
every factorized layer the report names."""

from __future__ import annotations

import statistics
from collections import defaultdict

import onnx

from ..passes.annotate import factorized_nodes
from .folder import BuildFolder

RANK_KEYS = ("rank", "k", "atoms", "sparsity", "density")  # per-kind parameters from compress/layers describe()


def layer_summary(layers: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for lay in layers:
        groups[lay["after"].get("kind", "dense")].append(lay)
    rows = []
    for kind, ls in sorted(groups.items()):
        params = {k: sorted({lay["after"][k] for lay in ls if k in lay["after"]}) for k in RANK_KEYS}
        rows.append({"kind": kind, "layers": len(ls),
                     "bytes_before": sum(lay["bytes_before"] for lay in ls),
                     "bytes_after": sum(lay["bytes_after"] for lay in ls),
                     **{k: {"min": v[0], "median": statistics.median(v), "max": v[-1]} for k, v in params.items() if v}})
    return rows


def form_summary(layers: list[dict]) -> dict[str, int]:
    """Layers per chosen form, where the method records one per layer (`--method auto`: form, rank, bits)."""
    forms: dict[str, int] = defaultdict(int)
    for lay in layers:
        if "form" in lay.get("metrics", {}):
            forms[lay["metrics"]["form"]] += 1
    return dict(sorted(forms.items()))


def summarize(bf: BuildFolder) -> dict:
    r = bf.report
    files = {p.name: p.stat().st_size for p in sorted(bf.path.iterdir()) if p.is_file()}
    graph = onnx.load(str(bf.model), load_external_data=False)
    named = factorized_nodes(graph)
    expected = r["size"].get("factorized_layers")
    lowered = any(p.get("pass") == "lower-custom-ops" and p.get("ops") for p in r.get("passes", []))
    f, q, e = r.get("fidelity") or {}, r.get("quality") or {}, r.get("engine") or {}
    lat = {f"{p['batch']}x{p['seq']}": {"compressed_ms": p["compressed"]["median_ms"],
                                        "original_ms": p.get("original", {}).get("median_ms")}
           for p in r.get("latency", {}).get("points", [])}
    return {
        "folder": str(bf.path),
        "model": r["model"], "method": {k: r["method"].get(k) for k in ("name", "ratio", "options")},
        "size": r["size"],
        "layers": layer_summary(r.get("layers", [])),
        "forms": form_summary(r.get("layers", [])),
        "plans": (r["method"].get("extra") or {}).get("held_out") or {},
        "plan": (r["method"].get("extra") or {}).get("plan"),
        "files": files,
        "graph": {"nodes": len(graph.graph.node), "factorized_layers_in_graph": len(named),
                  "factorized_layers_in_report": expected,
                  "consistent": expected is None or len(named) == expected or lowered},
        "checks": {
            "export": {"passed": f.get("passed"), "max_abs": f.get("max_abs"), "atol": f.get("atol"), "rtol": f.get("rtol")},
            "quality": q,
            "engine": {k: e.get(k) for k in ("backend", "executed", "reason", "engine_path", "plugin_layers") if k in e},
        },
        "latency": lat,
        "serving": {"hf_files": [n for n in ("config.json", "tokenizer.json", "tokenizer_config.json",
                                              "generation_config.json") if n in files],
                    "ort_optimized": (r.get("serving") or {}).get("ort_optimized", {}).get("reason"),
                    "triton_repository": [str(p.parent.relative_to(bf.path)) for p in bf.path.glob("*/*/config.pbtxt")]},
    }


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def render(s: dict) -> str:
    m, sz, c = s["model"], s["size"], s["checks"]
    lines = [f"{s['folder']}: {m['name']} ({m['kind']}), method {s['method']['name']} ratio {s['method']['ratio']}",
             f"weights: {_mb(sz['bytes_before'])} -> {_mb(sz['bytes_after'])}; targeted layers "
             f"{_mb(sz['targeted_bytes_before'])} -> {_mb(sz['targeted_bytes_after'])} "
             f"(-{sz['targeted_reduction'] * 100:.1f}%), {sz['factorized_layers']}/{sz['targeted_layers']} factorized",
             "layers:"]
    for row in s["layers"]:
        params = "; ".join(f"{k} {v['min']}..{v['max']} (median {v['median']})" for k, v in row.items()
                           if isinstance(v, dict))
        lines.append(f"  {row['kind']:<12} {row['layers']:>3} layers  {_mb(row['bytes_before'])} -> "
                     f"{_mb(row['bytes_after'])}" + (f"  {params}" if params else ""))
    if s.get("forms"):
        lines.append("forms: " + ", ".join(f"{k} x{v}" for k, v in s["forms"].items()))
    for label, v in (s.get("plans") or {}).items():  # auto: each plan's predicted error beside its measured held-out loss
        lines.append(f"plan '{label}'{' (kept)' if label == s.get('plan') else ''}: predicted summed error "
                     f"{v.get('predicted_error')}, measured held-out loss {v['loss']:.5g}"
                     + (f" (quality {v['quality']:.4f})" if "quality" in v else "") + f", {v['bytes']:,} bytes")
    g = s["graph"]
    lines.append(f"graph: {g['nodes']} nodes, {g['factorized_layers_in_graph']} factorized layers named in model.onnx "
                 f"(report: {g['factorized_layers_in_report']})" + ("" if g["consistent"] else "  INCONSISTENT"))
    ex = c["export"]
    lines.append(f"export check: {'PASSED' if ex['passed'] else 'FAILED'} (max abs {ex['max_abs']:.3g}, "
                 f"atol {ex['atol']}, rtol {ex['rtol']})")
    q = c["quality"].get("compressed") or {}
    if "perplexity" in q:
        lines.append(f"quality (wiki): perplexity {q['perplexity']} vs original {q.get('perplexity_original')}")
    elif q:
        lines.append(f"quality (wiki): embedding cosine {q['embedding_cosine_mean']}, polarity accuracy "
                     f"{q['polarity_accuracy']} vs original {q.get('polarity_accuracy_original')}")
    e = c["engine"]
    if e:
        lines.append(f"engine: {e.get('backend')}" + (f", {e['engine_path']}" if e.get("engine_path") else "")
                     + f", executed {e.get('executed')}")
    for k, v in s["latency"].items():
        lines.append(f"latency {k}: {v['compressed_ms']} ms (original {v['original_ms']} ms)")
    sv = s["serving"]
    lines.append(f"serving: {', '.join(sv['hf_files']) or 'no Hugging Face files'}"
                 + (f"; Triton models: {', '.join(sv['triton_repository'])}" if sv["triton_repository"] else ""))
    if sv["ort_optimized"]:
        lines.append(f"model.ort-optimized.onnx: {sv['ort_optimized']}")
    lines.append("files: " + ", ".join(f"{n} {_mb(b)}" for n, b in s["files"].items()))
    return "\n".join(lines)

