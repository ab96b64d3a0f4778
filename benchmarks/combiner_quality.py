"""Quality of Combiner attention installed post hoc into the trained models (no recovery training):
SmolLM2 perplexity at L = 1024 and 2048, and MiniLM sentence-embedding cosine to the original model,
for full attention and each pattern, in domain (wiki evaluation split) and out of domain (news, pydoc).

    flock /work/locks/heavy.lock env OMP_NUM_THREADS=1 python benchmarks/combiner_quality.py

Block = default_block(L) (about sqrt(L), a power of two): 32 at L=1024, 64 at L=2048, 16 for MiniLM's
sentences (max 128 tokens). Writes benchmarks/results/combiner_quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "combiner_quality.json"
VARIANTS = ("full", "combiner-fixed", "combiner-logsparse", "combiner-axial")
DOMAINS = ("wiki", "news", "pydoc")


def _model(name: str, variant: str, block: int, max_len: int):
    from factordeploy.attention import AttentionConfig, install_combiner
    from factordeploy.models.registry import load_model

    lm = load_model(name)
    if variant != "full":
        install_combiner(lm.model, AttentionConfig(kind=variant, block=block, max_len=max_len))
    return lm


def smollm2_rows(lengths: list[int], tokens: int) -> list[dict]:
    from factordeploy.attention import default_block
    from factordeploy.models.text import domain_texts
    from factordeploy.verify.quality import EvalConfig, perplexity

    rows = []
    for L in lengths:
        B = default_block(L)
        cfg = EvalConfig(ppl_windows=max(1, tokens // L), ppl_len=L)
        for v in VARIANTS:
            lm = _model("smollm2", v, B, L)
            for d in DOMAINS:
                t = time.perf_counter()
                ppl = perplexity(lm, lm.model, cfg, texts=domain_texts(d))
                rows.append({"model": "smollm2", "L": L, "block": B, "variant": v, "domain": d,
                             "perplexity": round(ppl, 3), "windows": cfg.ppl_windows, "seconds": round(time.perf_counter() - t, 1)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def minilm_rows(sentences: int) -> list[dict]:
    from factordeploy.attention import default_block
    from factordeploy.models import text as textmod
    from factordeploy.verify.quality import EvalConfig, embed

    cfg = EvalConfig(sentences=sentences)
    B = default_block(cfg.max_len)
    texts = {d: textmod.sentences(textmod.domain_texts(d))[:sentences] for d in DOMAINS}
    ref_lm = _model("minilm", "full", B, cfg.max_len)
    refs = {d: embed(ref_lm, ref_lm.model, texts[d], cfg) for d in DOMAINS}
    rows = []
    for v in VARIANTS[1:]:
        lm = _model("minilm", v, B, cfg.max_len)
        for d in DOMAINS:
            cos = (embed(lm, lm.model, texts[d], cfg) * refs[d]).sum(-1)
            rows.append({"model": "minilm", "block": B, "variant": v, "domain": d, "sentences": len(texts[d]),
                         "cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluated tokens per (L, variant, domain) cell")
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    rows = minilm_rows(a.sentences) + smollm2_rows([int(x) for x in a.lengths.split(",") if x], a.tokens)
    print(f"\n{'model':8} {'L':>5} {'B':>3} {'variant':20} " + " ".join(f"{d:>10}" for d in DOMAINS))
    keys = sorted({(r["model"], r.get("L", 128), r["block"], r["variant"]) for r in rows},
                  key=lambda k: (k[0], k[1], VARIANTS.index(k[3])))
    for m, L, B, v in keys:
        cells = {r["domain"]: r for r in rows if (r["model"], r.get("L", 128), r["block"], r["variant"]) == (m, L, B, v)}
        metric = "perplexity" if m == "smollm2" else "cosine_mean"
        print(f"{m:8} {L:>5} {B:>3} {v:20} " + " ".join(f"{cells[d][metric]:>10}" for d in DOMAINS))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"recovery": "none (post hoc)", "rows": rows, "command": " ".join(sys.argv)}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
