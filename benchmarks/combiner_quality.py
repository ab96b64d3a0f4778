"""Quality of Combiner attention before and after recovery training: SmolLM2 perplexity at L = 1024 and 2048
and MiniLM sentence-embedding cosine to the original model, for each pattern, in domain (wiki evaluation
split) and out of domain (news, pydoc: never trained, calibrated or selected on).

    /work/locks/slot env PYTHONPATH=. python benchmarks/combiner_quality.py --models minilm,smollm2

Combiner is installed into the trained, UNcompressed model (so the table isolates the attention change;
`deploy build` composes it with a --method), scored ("before": post hoc), then adapted by the recovery stage
(recover/: LoRA adapters on every linear but the LM head, distillation to the original model on the cached
teacher-generated + wiki-calibration windows, keep-best on the pydoc selection split) and scored again
("after"). Training windows are --seq-len tokens with block --train-block; the adapters live in the linears,
so the same recovered model is scored at every L with that length's block (default_block(L): 32 at
L=1024, 64 at L=2048; MiniLM 16 at its 128-token maximum). The original model (full attention) is the
reference row. Every scored cell is written to the JSON at once and a rerun skips finished cells and
patterns (resumable). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "combiner_quality.json"
PATTERNS = ("fixed", "logsparse", "axial")
DOMAINS = ("wiki", "news", "pydoc")


def _save(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)


def _find(data: dict, **key) -> dict | None:
    return next((r for r in data["rows"] if all(r.get(k) == v for k, v in key.items())), None)


def run_model(name: str, a: argparse.Namespace, data: dict, out: Path) -> None:
    import torch

    from factordeploy.attention import AttentionConfig, default_block, install_combiner
    from factordeploy.models.registry import load_model
    from factordeploy.progress import log
    from factordeploy.recover import RecoveryConfig, capture_teacher, recover
    from factordeploy.verify.quality import DomainProbe, EvalConfig

    torch.manual_seed(0)
    loaded = load_model(name)
    dec = loaded.kind == "decoder"
    lengths = [int(x) for x in a.lengths.split(",") if x] if dec else [128]
    probes = {L: DomainProbe(loaded, EvalConfig(ppl_windows=a.windows, ppl_len=L) if dec
                             else EvalConfig(sentences=a.sentences, max_len=L)) for L in lengths}
    for L, probe in probes.items():  # reference: the original model (encoders: its embeddings, kept in the probe)
        if dec and _find(data, model=name, L=L, variant="full"):
            continue
        t = time.perf_counter()
        q = probe.capture_original(loaded.model)
        if not _find(data, model=name, L=L, variant="full"):
            data["rows"].append({"model": name, "L": L, "block": None, "variant": "full", "stage": "original",
                                 "quality": q, "seconds": round(time.perf_counter() - t, 1)})
            _save(out, data)
    steps = a.smollm2_steps if dec else a.minilm_steps
    rcfg = RecoveryConfig(steps=steps, adapter="lora", rank=a.rank, batch=a.smollm2_batch if dec else a.minilm_batch,
                          samples=a.samples, seq_len=a.seq_len, include_dense=True, eval_windows=a.eval_windows,
                          eval_every=a.eval_every)
    todo = [p for p in a.patterns.split(",") if any(
        not _find(data, model=name, L=L, variant=f"combiner-{p}", stage=s) for L in lengths for s in ("before", "after"))]
    if not todo:
        return
    teacher = capture_teacher(loaded, loaded.model, rcfg)  # the ORIGINAL model's outputs on the training windows
    for p in todo:
        kind = f"combiner-{p}"
        model = copy.deepcopy(loaded.model)

        def score(stage: str, extra: dict) -> None:
            for L in lengths:
                if _find(data, model=name, L=L, variant=kind, stage=stage):
                    continue
                B = default_block(L)
                install_combiner(model, AttentionConfig(kind=kind, block=B, max_len=L))
                t = time.perf_counter()
                q = probes[L].score(model)
                data["rows"].append({"model": name, "L": L, "block": B, "variant": kind, "stage": stage, "quality": q,
                                     "seconds": round(time.perf_counter() - t, 1), **extra})
                _save(out, data)
                log(f"[combiner_quality] {name} L={L} {kind} {stage}: {q}")

        score("before", {})
        install_combiner(model, AttentionConfig(kind=kind, block=a.train_block, max_len=a.seq_len))
        rep = recover(loaded, model, teacher, rcfg)
        score("after", {"recovery": {"steps": steps, "batch": rcfg.batch, "seq_len": a.seq_len, "block": a.train_block,
                                     "samples": a.samples, "adapter": "lora (every linear but the LM head)",
                                     "rank": a.rank, "lr": rep.config["lr"], "data": rep.data,
                                     "seconds": rep.seconds, "best_step": rep.train["best_step"],
                                     "eval_curve": rep.train["eval_curve"], "loss_first": rep.train.get("loss_first"),
                                     "loss_last": rep.train.get("loss_last")}})
        del model


def render(data: dict) -> str:
    lines = []
    for name in sorted({r["model"] for r in data["rows"]}, key=lambda n: n != "minilm"):
        dec = name != "minilm"
        metric = "perplexity (lower is better)" if dec else "mean embedding cosine to the original (higher is better)"
        lines += ["", f"### {name}: {metric}", "",
                  "| L | block | attention | stage | recovery | wiki (in domain) | news | pydoc |",
                  "|---:|---:|---|---|---|---:|---:|---:|"]
        rows = sorted((r for r in data["rows"] if r["model"] == name),
                      key=lambda r: (r["L"], r["variant"] != "full", r["variant"], r["stage"] != "before"))
        for r in rows:
            rec = r.get("recovery")
            how = f"{rec['steps']} steps x {rec['batch']} x {rec['seq_len']} tok, {rec['seconds']:.0f} s" if rec else "-"
            q = r["quality"]
            lines.append(f"| {r['L']} | {r['block'] or '-'} | {r['variant']} | {r['stage']} | {how} | "
                         + " | ".join(f"{q[d]:g}" for d in DOMAINS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm,smollm2")
    ap.add_argument("--patterns", default=",".join(PATTERNS))
    ap.add_argument("--lengths", default="1024,2048", help="SmolLM2 evaluation lengths")
    ap.add_argument("--windows", type=int, default=1, help="SmolLM2: evaluation windows of L tokens per domain")
    ap.add_argument("--sentences", type=int, default=64, help="MiniLM: evaluation sentences per domain")
    ap.add_argument("--minilm-steps", type=int, default=40)
    ap.add_argument("--smollm2-steps", type=int, default=20)
    ap.add_argument("--minilm-batch", type=int, default=4)
    ap.add_argument("--smollm2-batch", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128, help="training windows (128 x 128 = the cached teacher text)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-block", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=8, help="held-out selection windows (keep-best)")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render", action="store_true", help="only print the table of --out")
    a = ap.parse_args()
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if not a.render:
        data.setdefault("commands", []).append(" ".join(sys.argv))
        for name in a.models.split(","):
            run_model(name, a, data, out)
    print(render(data))


if __name__ == "__main__":
    main()
