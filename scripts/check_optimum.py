"""Does a build folder load in Hugging Face Optimum, and does it compute what the build computed?

Optimum (`optimum-onnx`) pins transformers 4.57 while factordeploy runs on transformers 5, so the
check runs on two sides:

1. reference (this project's venv): the ORIGINAL model's tokenizer (what the build used) tokenizes
   fixed texts (held-out wiki and out-of-domain news); a plain ONNX Runtime session on
   DIR/model.onnx computes the outputs; decoders also get a greedy continuation (full recompute,
   no cache). Saved to an .npz.
2. optimum (a separate venv with optimum-onnx): transformers 4.57's AutoConfig / AutoTokenizer and
   `ORTModelForFeatureExtraction` / `ORTModelForCausalLM.from_pretrained(DIR)` load the folder; token
   ids must be identical, outputs within tolerance, RoPE theta as in the folder's config, and
   `generate()` (greedy) must produce the same tokens.

    python scripts/check_optimum.py build/minilm-svd [--optimum-python /work/venvs/optimum/bin/python]
    python scripts/check_optimum.py build/smollm2-cospadi --speed-tokens 128 --threads 1   # + Optimum's decode speed

Prints one JSON line per side; exits 1 when any comparison fails, 2 when the folder or the optimum
venv is missing. Make the venv with `bash scripts/setup_optimum.sh` (CPU torch first, then optimum-onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NEW_TOKENS = 8
N_WIKI, N_NEWS = 4, 2
DEFAULT_OPTIMUM_PYTHONS = (os.environ.get("FACTORDEPLOY_OPTIMUM_PYTHON", ""),
                           str(Path(__file__).resolve().parent.parent / ".venv-optimum" / "bin" / "python"),
                           "/work/venvs/optimum/bin/python")


def optimum_python() -> str | None:
    return next((p for p in DEFAULT_OPTIMUM_PYTHONS if p and Path(p).is_file()), None)


# ---------------------------------------------------------------- reference side (transformers 5)

def _graph_inputs(sess) -> dict:
    return {i.name: i for i in sess.get_inputs()}


def _feeds(sess, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one unpadded sequence; past tensors (if the graph has them) empty."""
    feeds = {}
    for name, meta in _graph_inputs(sess).items():
        if name == "input_ids":
            feeds[name] = ids
        elif name in ("attention_mask", "token_type_ids"):
            feeds[name] = (np.ones_like(ids) if name == "attention_mask" else np.zeros_like(ids))
        elif name == "position_ids":
            feeds[name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        elif name.startswith("past_key_values"):
            shape = [1 if i == 0 else (0 if not isinstance(d, int) else d) for i, d in enumerate(meta.shape)]
            feeds[name] = np.zeros(shape, dtype=np.float32)
    return feeds


def reference(folder: Path, out: Path, speed_prompt: int = 0) -> dict:
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from factordeploy.models.text import domain_texts, sentences

    rep = json.loads((folder / "report.json").read_text())
    kind = rep["model"]["kind"]
    tok = AutoTokenizer.from_pretrained(rep["model"]["source"])  # the tokenizer the build used
    texts = sentences(domain_texts("wiki"))[:N_WIKI] + sentences(domain_texts("news"))[:N_NEWS]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    out_name = sess.get_outputs()[0].name
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(texts):
        ids = np.asarray(tok(t, return_tensors="np")["input_ids"], dtype=np.int64)
        arrays[f"ids_{i}"] = ids
        arrays[f"out_{i}"] = sess.run([out_name], _feeds(sess, ids))[0]
        if kind == "decoder" and i < 2:
            seq = ids
            for _ in range(NEW_TOKENS):
                logits = sess.run([out_name], _feeds(sess, seq))[0]
                seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
            arrays[f"greedy_{i}"] = seq
    if kind == "decoder" and speed_prompt:  # a held-out wiki prompt of exactly speed_prompt tokens
        ids = tok(" ".join(sentences(domain_texts("wiki"))[:200]), return_tensors="np")["input_ids"][:, :speed_prompt]
        arrays["speed_ids"] = np.asarray(ids, dtype=np.int64)
    cfg = json.loads((folder / "config.json").read_text())
    rope = (cfg.get("rope_parameters") or {}).get("rope_theta")
    np.savez(out, **arrays)
    return {"side": "reference", "kind": kind, "texts": texts, "output": out_name, "rope_theta": rope,
            "graph_inputs": list(_graph_inputs(sess))}


# ---------------------------------------------------------------- optimum side (transformers 4.57)

def optimum_side(folder: Path, ref_json: dict, ref_npz: Path, speed_tokens: int = 0, threads: int = 0) -> dict:
    import optimum.onnxruntime as oo
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    ref = np.load(ref_npz)
    kind, texts = ref_json["kind"], ref_json["texts"]
    has_past = any(n.startswith("past_key_values") for n in ref_json["graph_inputs"])
    res: dict = {"side": "optimum", "transformers": transformers.__version__, "checks": {}}
    checks = res["checks"]
    config = AutoConfig.from_pretrained(folder)
    if ref_json.get("rope_theta") is not None:
        checks["rope_theta"] = {"read": getattr(config, "rope_theta", None), "expected": ref_json["rope_theta"],
                                "passed": getattr(config, "rope_theta", None) == ref_json["rope_theta"]}
    tok = AutoTokenizer.from_pretrained(folder)
    res["tokenizer"] = type(tok).__name__
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # 0 = ORT's default (all cores)
    if kind == "decoder":
        model = oo.ORTModelForCausalLM.from_pretrained(folder, use_cache=has_past, use_io_binding=False, session_options=so)
    else:
        model = oo.ORTModelForFeatureExtraction.from_pretrained(folder)
    res["class"] = type(model).__name__
    ids_ok, max_abs, max_ref = True, 0.0, 0.0
    for i, t in enumerate(texts):
        enc = tok(t, return_tensors="pt")
        ids_ok &= bool(np.array_equal(enc["input_ids"].numpy(), ref[f"ids_{i}"]))
        out = model(**enc)
        got = (out.logits if kind == "decoder" else out.last_hidden_state).detach().numpy()
        want = ref[f"out_{i}"]
        if got.shape != want.shape:
            max_abs = float("inf")
            continue
        max_abs = max(max_abs, float(np.abs(got - want).max()))
        max_ref = max(max_ref, float(np.abs(want).max()))
    atol = 1e-3 if kind == "decoder" else 1e-4
    checks["token_ids_identical"] = {"passed": ids_ok, "texts": len(texts)}
    checks["outputs"] = {"max_abs": max_abs, "reference_max_abs": max_ref, "atol": atol, "passed": max_abs <= atol}
    if kind == "decoder":
        same = []
        for i in range(2):
            ids = ref[f"ids_{i}"]
            import torch
            gen = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
            same.append(bool(np.array_equal(gen.numpy(), ref[f"greedy_{i}"])))
        checks["greedy_generate_identical"] = {"passed": all(same), "prompts": len(same), "new_tokens": NEW_TOKENS,
                                               "use_cache": has_past}
        if speed_tokens and "speed_ids" in ref:
            res["speed"] = _generate_speed(model, ref["speed_ids"], speed_tokens, threads)
    res["passed"] = all(c["passed"] for c in checks.values())
    return res


def _generate_speed(model, ids: np.ndarray, new_tokens: int, threads: int) -> dict:
    """Optimum's own greedy generate(), timed like SERVING.md's figure: new tokens / wall time, prefill included."""
    import time

    import torch

    x = torch.from_numpy(ids)
    kw = dict(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False)
    model.generate(**kw, max_new_tokens=4, min_new_tokens=4)  # warm-up
    t0 = time.perf_counter()
    model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    dt = time.perf_counter() - t0
    return {"prompt_tokens": int(ids.shape[1]), "new_tokens": new_tokens, "threads": threads or "ort default",
            "seconds": round(dt, 6), "tokens_per_s": round(new_tokens / dt, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--optimum-python", default=None, help="python of a venv with optimum-onnx installed")
    ap.add_argument("--speed-tokens", type=int, default=0,
                    help="decoders: also time Optimum's generate() of N new tokens after a 128-token prompt")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads on the Optimum side (0 = default)")
    ap.add_argument("--side", choices=["both", "optimum"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--ref", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if not (a.folder / "model.onnx").is_file() or not (a.folder / "config.json").is_file():
        print(f"error: {a.folder} is not a build folder with model.onnx and config.json", file=sys.stderr)
        return 2
    if a.side == "optimum":
        ref_json = json.loads(a.ref.with_suffix(".json").read_text())
        res = optimum_side(a.folder, ref_json, a.ref, a.speed_tokens, a.threads)
        print(json.dumps(res))
        return 0 if res["passed"] else 1
    py = a.optimum_python or optimum_python()
    if not py:
        print("error: no Python with optimum-onnx found. Fix: bash scripts/setup_optimum.sh "
              "(or pass --optimum-python / set FACTORDEPLOY_OPTIMUM_PYTHON)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as td:
        ref_npz = Path(td) / "ref.npz"
        ref_json = reference(a.folder, ref_npz, 128 if a.speed_tokens else 0)
        ref_npz.with_suffix(".json").write_text(json.dumps(ref_json))
        print(json.dumps({k: v for k, v in ref_json.items() if k != "texts"}))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        p = subprocess.run([py, __file__, str(a.folder), "--side", "optimum", "--ref", str(ref_npz),
                            "--speed-tokens", str(a.speed_tokens), "--threads", str(a.threads)],
                           capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        print(f"error: the optimum side failed (exit {p.returncode}):\n{p.stderr[-3000:]}", file=sys.stderr)
        return 1
    print(lines[-1])
    return p.returncode


if __name__ == "__main__":
    sys.exit(main())
