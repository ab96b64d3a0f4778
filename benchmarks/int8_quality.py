"""int8 on top of factorization vs int8 alone, at equal bytes, measured on the ONNX Runtime artifacts.

Every variant is exported and run through the ORT pass pipeline; int8 variants are quantized
with engines/quantize.py (what `deploy build --quantize int8` ships). Quality is scored on the
artifact itself with ONNX Runtime:

* encoders (MiniLM): mean cosine of sentence embeddings vs the original fp32 torch model on
  256 sentences per domain - wiki (held-out split, in domain), news and pydoc (out of domain:
  never used for calibration);
* decoders (SmolLM2): perplexity per domain (--ppl-windows x --ppl-len tokens).

Equal-bytes pairs: int8 alone stores ~1/4 of the targeted layers' fp32 bytes, the same as a
factorization at --ratio 0.75 in fp32; int8 + factorization at 0.5 stores 1/8, like fp32 at 0.875.

    flock /work/locks/heavy.lock env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/int8_quality.py \\
        --model minilm --method svd-whiten

Prints a table, writes benchmarks/results/int8_quality-<model>-<method>.json (resumable per variant).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DOMAINS = ("wiki", "news", "pydoc")
# (ratio or None for the original, quantize)
VARIANTS = [(None, "none"), (None, "int8"), (0.2, "none"), (0.2, "int8"), (0.35, "int8"), (0.5, "none"),
            (0.5, "int8"), (0.75, "none"), (0.875, "none")]


def domain_scores(loaded, model, refs: dict, args) -> dict:
    """Per domain: embedding cosine vs the original (encoders) or perplexity (decoders)."""
    from factordeploy.models.text import domain_texts, sentences
    from factordeploy.verify.quality import EvalConfig, embed, perplexity

    out = {}
    for d in DOMAINS:
        if loaded.kind == "encoder":
            emb = embed(loaded, model, sentences(domain_texts(d))[: args.sentences], EvalConfig(batch=32))
            out[d] = round(float((emb * refs[d]).sum(-1).mean()), 5) if d in refs else emb
        else:
            out[d] = round(perplexity(loaded, model, EvalConfig(ppl_windows=args.ppl_windows, ppl_len=args.ppl_len),
                                      texts=domain_texts(d)), 4)
    return out


def build_variant(loaded, session, method: str, ratio, quant: str, work: Path):
    import onnx

    from factordeploy.engines.quantize import quantize_int8
    from factordeploy.export import export_onnx
    from factordeploy.passes.pipeline import PassContext, run_pipeline
    from factordeploy.passes.presets import ort_pipeline
    from factordeploy.pipeline import compress_copy

    info = {}
    if ratio is None:
        model, layers = loaded.model, {}
        info["targeted_bytes"] = sum(m.weight.numel() * 4 for n, m in loaded.model.named_modules() if n in set(session.targets))
    else:
        model, result, _ = compress_copy(session, method, ratio)
        layers = {r.name: r.after for r in result.layers if r.after.get("kind") != "dense"}
        info["targeted_bytes"] = result.bytes_after
    export_onnx(loaded, model, work / "raw.onnx")
    proto = run_pipeline(onnx.load(str(work / "raw.onnx")), ort_pipeline(), PassContext(layers=layers, target="ort"))
    path = work / "model.onnx"
    onnx.save_model(proto, str(path))
    if quant == "int8":
        quantize_int8(path, work / "model.int8.onnx")
        path = work / "model.int8.onnx"
        info["targeted_bytes"] = info["targeted_bytes"] / 4  # int8 weights; per-channel scales add < 1%
    info["file_bytes"] = path.stat().st_size
    return path, info


@click.command()
@click.option("--model", default="minilm", show_default=True)
@click.option("--method", default="svd-whiten", show_default=True)
@click.option("--sentences", "n_sent", type=int, default=256, show_default=True)
@click.option("--ppl-windows", type=int, default=4, show_default=True)
@click.option("--ppl-len", type=int, default=512, show_default=True)
@click.option("--calib", type=int, default=128, show_default=True)
@click.option("--variants", default="", help="subset, e.g. '-:none,-:int8,0.5:int8,0.75:none' (ratio or - : quantize)")
@click.option("--out", default=None)
def main(model, method, n_sent, ppl_windows, ppl_len, calib, variants, out):
    from factordeploy.compress.calibration import CalibrationConfig
    from factordeploy.engines.ort_model import OrtModel
    from factordeploy.pipeline import open_session
    from factordeploy.progress import log

    args = type("Args", (), {"sentences": n_sent, "ppl_windows": ppl_windows, "ppl_len": ppl_len})
    out_path = Path(out or f"benchmarks/results/int8_quality-{model}-{method}.json")
    doc = json.loads(out_path.read_text()) if out_path.exists() else {"rows": []}
    done = {(r["ratio"], r["quantize"]) for r in doc["rows"]}
    session = open_session(model, CalibrationConfig(n=calib, length=128, seed=0), evaluate=False)
    loaded = session.loaded
    chosen = [(None if r == "-" else float(r), q) for r, q in (v.split(":") for v in variants.split(",") if v)] or VARIANTS
    pending = [v for v in chosen if v not in done]
    refs = domain_scores(loaded, loaded.model, {}, args) if loaded.kind == "encoder" and pending else {}
    work = Path("build/int8_quality") / Path(model).name  # never the model folder itself (absolute paths)
    for ratio, quant in chosen:
        if (ratio, quant) in done:
            continue
        log(f"variant {method} {ratio} {quant}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        t0 = time.perf_counter()
        path, info = build_variant(loaded, session, method, ratio, quant, work)
        scores = domain_scores(loaded, OrtModel(path, threads=1), refs, args)
        doc["rows"].append({"method": method if ratio is not None else "original", "ratio": ratio, "quantize": quant,
                            **info, **scores, "seconds": round(time.perf_counter() - t0, 1)})
        doc["setup"] = {"model": model, "metric": "embedding cosine vs original fp32" if loaded.kind == "encoder"
                        else f"perplexity ({ppl_windows} x {ppl_len})", "sentences": n_sent}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.with_suffix(".tmp").write_text(json.dumps(doc, indent=2))
        os.replace(out_path.with_suffix(".tmp"), out_path)
    shutil.rmtree(work, ignore_errors=True)
    tset = set(session.targets)
    base_t = sum(m.weight.numel() * 4 for n, m in loaded.model.named_modules() if n in tset)  # fp32 targeted bytes
    rows = sorted(doc["rows"], key=lambda r: -r["targeted_bytes"])
    lines = [f"{model}, {doc['setup']['metric']}; ONNX Runtime artifacts", "",
             "| variant | weights | targeted bytes (of fp32) | file MB | " + " | ".join(DOMAINS) + " |",
             "|---|---|---:|---:|" + "---:|" * len(DOMAINS)]
    for r in rows:
        name = "original" if r["ratio"] is None else f"{r['method']} {r['ratio']}"
        lines.append(f"| {name} | {'int8' if r['quantize'] == 'int8' else 'fp32'} | {r['targeted_bytes'] / base_t:.3f} | "
                     f"{r['file_bytes'] / 1e6:.1f} | " + " | ".join(f"{r[d]:.4f}" for d in DOMAINS) + " |")
    table = "\n".join(lines)
    print(table)
    out_path.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
