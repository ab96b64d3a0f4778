"""`deploy verify DIR`: re-check an existing build folder on inputs its build never used.

The build's own export check compares the compressed torch model with model.onnx; that torch
model is not stored in the folder, so a re-check compares what the folder holds with what can
be rebuilt from its report:
1. artifacts agree - every other ONNX Runtime graph kept in the folder (model.ort-optimized.onnx)
   against model.onnx, elementwise at the build's export tolerances;
2. quality vs the ORIGINAL model (loaded from the report's source, or --original) on a text
   domain and seed of the user's choice: encoders - mean embedding cosine must stay >= the
   build's recorded in-domain figure minus `tolerance` (or --min-cosine); decoders - the
   perplexity ratio must stay <= the recorded ratio x (1 + tolerance) (or --max-ppl-ratio).
A failure exits non-zero (cli.py); a bad folder is a one-line UserError.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import UserError
from ..models.registry import LoadedModel, load_model
from ..serve.folder import BuildFolder, check_external_data
from .domains import DomainSample, decoder_agreement, domain_sentences, encoder_agreement
from ..engines.ort_model import OrtModel

FALLBACK_MIN_COSINE = 0.9  # folders built with --no-eval record no quality to compare with
FALLBACK_MAX_PPL_RATIO = 1.5


@dataclass
class VerifyConfig:
    sample: DomainSample = field(default_factory=lambda: DomainSample(seed=1))
    tolerance: float = 0.05
    min_cosine: float | None = None
    max_ppl_ratio: float | None = None
    original: str | None = None


def load_original(bf: BuildFolder, original: str | None) -> LoadedModel:
    m = bf.report["model"]
    if original:
        return load_model(original)
    from ..models.registry import REGISTRY

    return load_model(m["name"] if m["name"] in REGISTRY else m["source"])


def thresholds(report: dict, cfg: VerifyConfig) -> dict:
    q = (report.get("quality") or {}).get("compressed") or {}
    if report["model"]["kind"] == "encoder":
        if cfg.min_cosine is not None:
            return {"min_cosine": cfg.min_cosine, "from": "--min-cosine"}
        if "embedding_cosine_mean" in q:
            return {"min_cosine": round(q["embedding_cosine_mean"] - cfg.tolerance, 5),
                    "from": f"build's wiki cosine {q['embedding_cosine_mean']} - tolerance {cfg.tolerance}"}
        return {"min_cosine": FALLBACK_MIN_COSINE, "from": "no recorded quality (built with --no-eval): default"}
    if cfg.max_ppl_ratio is not None:
        return {"max_ppl_ratio": cfg.max_ppl_ratio, "from": "--max-ppl-ratio"}
    if "perplexity" in q and q.get("perplexity_original"):
        r = q["perplexity"] / q["perplexity_original"]
        return {"max_ppl_ratio": round(r * (1 + cfg.tolerance), 4),
                "from": f"build's wiki perplexity ratio {r:.4f} x (1 + tolerance {cfg.tolerance})"}
    return {"max_ppl_ratio": FALLBACK_MAX_PPL_RATIO, "from": "no recorded quality (built with --no-eval): default"}


def artifacts_agree(bf: BuildFolder, loaded: LoadedModel, cfg: VerifyConfig) -> list[dict]:
    """Other ORT graphs in the folder vs model.onnx on the new inputs."""
    f = bf.report.get("fidelity") or {}
    atol, rtol = f.get("atol", 1e-4), f.get("rtol", 1e-3)
    out = []
    opt = bf.path / "model.ort-optimized.onnx"
    if not opt.is_file():
        return out
    check_external_data(opt, bf.path)
    ref, test = OrtModel(bf.model), OrtModel(opt)
    texts = domain_sentences(cfg.sample)[:8]
    worst, passed = 0.0, True
    for i in range(0, len(texts), 4):
        enc = loaded.encode(texts[i:i + 4], cfg.sample.max_len)
        a = loaded.output(ref, enc).numpy()
        b = loaded.output(test, enc).numpy()
        diff = np.abs(a - b)
        worst = max(worst, float(diff.max()))
        passed &= bool((diff <= atol + rtol * np.abs(a)).all())
    out.append({"check": "model.ort-optimized.onnx vs model.onnx", "passed": passed, "max_abs": worst,
                "atol": atol, "rtol": rtol, "inputs": len(texts)})
    return out


def verify_folder(bf: BuildFolder, cfg: VerifyConfig) -> dict:
    kind = bf.report["model"]["kind"]
    loaded = load_original(bf, cfg.original)
    if loaded.kind != kind:
        raise UserError(f"the original model is a {loaded.kind} but the folder holds a {kind}",
                        "pass the right model with --original")
    checks = artifacts_agree(bf, loaded, cfg)
    test = OrtModel(bf.model)
    th = thresholds(bf.report, cfg)
    with torch.no_grad():
        if kind == "encoder":
            q, _ = encoder_agreement(loaded, loaded.model, test, cfg.sample)
            passed = q["cosine_mean"] >= th["min_cosine"]
        else:
            q = decoder_agreement(loaded, loaded.model, test, cfg.sample)
            passed = q["perplexity_ratio"] <= th["max_ppl_ratio"]
    checks.append({"check": f"quality vs the original on {cfg.sample.domain} (seed {cfg.sample.seed})",
                   "passed": passed, **q, "threshold": th})
    return {"folder": str(bf.path), "sample": asdict(cfg.sample), "checks": checks,
            "passed": all(c["passed"] for c in checks)}


def render(res: dict) -> str:
    lines = []
    for c in res["checks"]:
        detail = {k: v for k, v in c.items() if k not in ("check", "passed", "threshold")}
        th = c.get("threshold")
        lines.append(f"[{'PASS' if c['passed'] else 'FAIL'}] {c['check']}: "
                     + ", ".join(f"{k} {v}" for k, v in detail.items())
                     + (f"; threshold {', '.join(f'{k} {v}' for k, v in th.items())}" if th else ""))
    lines.append(f"verify {'PASSED' if res['passed'] else 'FAILED'}: {res['folder']}")
    return "\n".join(lines)
