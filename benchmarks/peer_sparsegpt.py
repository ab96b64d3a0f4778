"""Peer check: our `sparse24 --score sparsegpt` against llm-compressor's SparseGPT 2:4 on SmolLM2.

    bash scripts/setup_peer_sparsegpt.sh        # once: the reference in its own venv (/work/peer-venv)
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/peer_sparsegpt.py

Same model (the project's converted fp32 SmolLM2 folder), same calibration windows (the project's
`Calibration`, dumped to .npy and read by the peer as an in-memory dataset), same targets (the 7
per-block projections; embeddings / lm_head untouched), same block size and dampening, and the same
evaluator (`DomainProbe`: wiki in domain, news + pydoc out of domain). The reference runs in a
subprocess (benchmarks/peer/sparsegpt_llmcompressor.py) and saves its pruned weights, which are loaded
into a copy of our original model here. Peer pipelines: `sequential` (llm-compressor's default for
SparseGPT: each block's Hessians come from the outputs of the already-pruned blocks before it) and
`basic` (one pass of the dense model, as our method does). Peer weights are cached in --work
(keyed by model, windows and settings); rerunning skips the prune.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import click
import numpy as np
import torch
from torch import nn

from factordeploy.compress.calibration import CalibrationConfig
from factordeploy.compress.layers import SPARSE24_GROUP, SPARSE24_KEEP
from factordeploy.compress.linalg import output_error
from factordeploy.compress.methods.sparse24 import sparsegpt_prune
from factordeploy.models.registry import cache_dir
from factordeploy.pipeline import Session, compress_copy, open_session
from factordeploy.recover.blockwise import BlockwiseConfig
from factordeploy.progress import log, set_quiet
from factordeploy.verify.quality import DomainProbe, EvalConfig

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmarks" / "peer" / "sparsegpt_llmcompressor.py"
DOMAINS = ("wiki", "news", "pydoc")
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _save(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def dense_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The (dense-shaped) weight of each named layer, whatever its class."""
    return {n: model.get_submodule(n).weight.detach() for n in names}


def frac_24(W: torch.Tensor) -> float:
    """Fraction of groups of 4 along the input dim with at most 2 nonzeros (1.0 = valid 2:4)."""
    nz = (W != 0).reshape(W.shape[0], -1, SPARSE24_GROUP).sum(-1)
    return float((nz <= SPARSE24_KEEP).float().mean())


def check_targets(session: Session) -> list[str]:
    """Our targets must be exactly the 7 projections of every decoder block (what the peer prunes)."""
    targets = list(session.targets)
    layers = session.loaded.model.config.num_hidden_layers
    want = [f"model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}" for i in range(layers) for p in PROJ]
    if sorted(targets) != sorted(want):
        raise click.ClickException(f"our targets are not the 7 projections x {layers} blocks: {targets[:4]}...")
    return targets


def write_windows(session: Session, folder: Path) -> tuple[Path, str]:
    """The project's calibration windows as an (n, length) int64 .npy; returns (path, content hash)."""
    ids = np.asarray(session.calibration.windows(), dtype=np.int64)
    digest = hashlib.sha256(ids.tobytes()).hexdigest()[:16]
    path = folder / f"calib-{ids.shape[0]}x{ids.shape[1]}-{digest}.npy"
    if not path.exists():
        np.save(path, ids)
    return path, digest


def peer_python(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        raise click.ClickException(f"peer venv missing ({py}): run scripts/setup_peer_sparsegpt.sh")
    return py


def run_peer(py: Path, model_dir: str, windows: Path, out: Path, pipeline: str, block: int, damp: float) -> dict:
    """Prune with llm-compressor in the peer venv (skipped when `out` exists); returns its meta json."""
    meta = out.with_name(out.name + ".json")
    if out.exists() and meta.exists():
        log(f"peer weights cached: {out}")
        return json.loads(meta.read_text())
    cmd = [str(py), str(RUNNER), "--model-dir", model_dir, "--windows", str(windows), "--out", str(out),
           "--pipeline", pipeline, "--block-size", str(block), "--damp", str(damp)]
    log(f"llm-compressor SparseGPT 2:4 ({pipeline} pipeline) in {py.parent.parent}")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the peer must not see this project's code
    logf = out.with_name(out.name + ".log")
    with open(logf, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not out.exists():
        raise click.ClickException(f"peer run failed (exit {rc}); see {logf}")
    return json.loads(meta.read_text())


def load_peer(original: nn.Module, path: Path) -> nn.Module:
    """A copy of the original model with the peer's saved state dict (a tied lm_head comes with the embedding)."""
    from safetensors.torch import load_file

    model = copy.deepcopy(original)
    res = model.load_state_dict(load_file(str(path)), strict=False)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if res.unexpected_keys or set(res.missing_keys) - ({"lm_head.weight"} if tied else set()):
        raise click.ClickException(f"peer weights do not fit the model: missing {res.missing_keys[:3]}, "
                                   f"unexpected {res.unexpected_keys[:3]}")
    return model.eval()


def structure(original: nn.Module, pruned: nn.Module, targets: list[str]) -> dict:
    """2:4 conformance of the targets, which linears changed, and whether everything else is bit-identical."""
    sd0, sd1 = original.state_dict(), pruned.state_dict()
    w1 = dense_weights(pruned, targets)
    changed = sorted(n for n, m in original.named_modules() if isinstance(m, nn.Linear)
                     and not torch.equal(m.weight, pruned.get_submodule(n).weight))
    key = {f"{n}.weight" for n in targets}
    other = [k for k in sd0 if k not in key and k in sd1 and not torch.equal(sd0[k], sd1[k])]
    groups = sum(W.numel() // SPARSE24_GROUP for W in w1.values())
    ok = sum(frac_24(W) * (W.numel() // SPARSE24_GROUP) for W in w1.values())
    return {"frac_24_groups": round(ok / groups, 6), "density": round(sum(int((W != 0).sum()) for W in w1.values())
                                                                     / sum(W.numel() for W in w1.values()), 6),
            "changed_linears": len(changed), "changed_equals_targets": changed == sorted(targets),
            "non_target_params_changed": other, "lm_head_embed_untouched": not any(
                k.startswith(("lm_head", "model.embed_tokens")) for k in other)}


def layer_errors(original: nn.Module, variants: dict[str, nn.Module], grams: dict[str, torch.Tensor],
                 targets: list[str]) -> dict[str, list[float]]:
    """||X (W - W_p)^T|| / ||X W^T|| per target on the ORIGINAL model's calibration inputs (X^T X = G)."""
    w0 = dense_weights(original, targets)
    out = {}
    for label, model in variants.items():
        wp = dense_weights(model, targets)
        out[label] = [output_error(w0[n], wp[n], grams[n]) / output_error(w0[n], torch.zeros_like(w0[n]), grams[n])
                      for n in targets]
    return out


@torch.no_grad()
def input_gram(session: Session, model: nn.Module, name: str) -> torch.Tensor:
    """X^T X (float64) of one layer's input in `model` over the calibration windows."""
    acc: list[torch.Tensor] = []

    def hook(_m, inputs, _o):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
        acc.append(x.T @ x)

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        for batch in session.calibration.batches():
            session.loaded.output(model, batch)
    finally:
        h.remove()
    return torch.stack(acc).sum(0)


def mask_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a != 0) == (b != 0)).float().mean())


def same_hessian_check(session: Session, peer_seq: nn.Module, name: str, block: int, damp: float) -> dict:
    """Our sparsegpt_prune run on the Hessian llm-compressor's sequential pass saw for `name` (a q_proj: its
    input is the block input, i.e. the outputs of the pruned blocks before it) vs the peer's weight."""
    G = input_gram(session, peer_seq, name)
    W0 = session.loaded.model.get_submodule(name).weight.detach()
    ours = sparsegpt_prune(W0, G, block, damp).to(W0.dtype)
    peer = peer_seq.get_submodule(name).weight.detach()
    ref = output_error(W0, torch.zeros_like(W0), G)
    return {"layer": name, "mask_agreement": round(mask_agreement(ours, peer), 5),
            "ours_rel_error": round(output_error(W0, ours, G) / ref, 6),
            "peer_rel_error": round(output_error(W0, peer, G) / ref, 6),
            "weight_rel_diff": round(float((ours - peer).norm() / peer.norm()), 6)}


def diagnose(session: Session, ours: nn.Module, peers: dict[str, nn.Module], targets: list[str], block: int,
             damp: float) -> dict:
    """Where a gap comes from: errors on the original inputs, block 0 (identical inputs in every pipeline), and
    one deep layer pruned by our code on the peer's own (sequential) Hessian."""
    original = session.loaded.model
    grams = session.calibration.grams(original, targets)
    errs = layer_errors(original, {"ours": ours, **{f"llmcompressor {k}": m for k, m in peers.items()}}, grams, targets)
    d: dict = {"mean_rel_output_error_on_original_inputs": {k: round(float(np.mean(v)), 6) for k, v in errs.items()},
               "per_layer_rel_output_error_on_original_inputs": {k: [round(x, 6) for x in v] for k, v in errs.items()},
               "targets": targets}
    w_ours = dense_weights(ours, targets)
    d["mask_agreement_with_ours"] = {}
    for k, m in peers.items():
        wp = dense_weights(m, targets)
        agree = [mask_agreement(w_ours[n], wp[n]) for n in targets]
        d["mask_agreement_with_ours"][k] = {"block0": round(float(np.mean(agree[:len(PROJ)])), 5),
                                            "all": round(float(np.mean(agree)), 5)}
    if "sequential" in peers:
        mid = session.loaded.model.config.num_hidden_layers // 2
        d["same_hessian"] = same_hessian_check(session, peers["sequential"], f"model.layers.{mid}.self_attn.q_proj",
                                               block, damp)
    return d


def _linears(st: dict) -> str:
    same = "= targets" if st["changed_equals_targets"] else "!= targets"
    rest = "rest bit-identical" if not st["non_target_params_changed"] else f"{len(st['non_target_params_changed'])} other params changed"
    return f"{st['changed_linears']} {same}, {rest}"


def render(data: dict) -> str:
    orig = data["original"]
    s = data["settings"]
    lines = [f"### SparseGPT 2:4 peer check, {data['model']}: perplexity (x = ratio to the original; lower is better)",
             "", f"Calibration {s['calib']} windows x {s['calib_len']} tokens (project windows, seed 0); evaluation "
             f"{s['ppl_windows']} x 512 tokens per domain; block size {s['block_size']}, dampening {s['damp']} x mean "
             f"diag(H) in both; targets: the 7 projections x {s['blocks']} blocks (lm_head / embeddings dense) in both; "
             f"{data['peer_version']}. prune s = calibration passes + pruning, {data['threads']} "
             "thread(s); ours runs the OBS loop in float64, llm-compressor in float32.", "",
             "| model | wiki | news | pydoc | worst | 2:4 groups | pruned linears | prune s |",
             "|---|---:|---:|---:|---:|---:|---|---:|",
             "| original | " + " | ".join(f"{orig[d]:.4g}" for d in DOMAINS) + " | 1.00x | - | - | - |"]
    for r in data["rows"]:
        q = r["quality"]
        rel = {d: q[d] / orig[d] for d in DOMAINS}
        lines.append(f"| {r['label']} | " + " | ".join(f"{q[d]:.4g} ({rel[d]:.2f}x)" for d in DOMAINS)
                     + f" | {max(rel.values()):.2f}x | {r['structure']['frac_24_groups']:.4f} | {_linears(r['structure'])} "
                     f"| {r['prune_s']:.0f} |")
    dg = data.get("diagnosis")
    if dg:
        lines += ["", "Mean relative output error per layer on the original model's calibration inputs: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in dg["mean_rel_output_error_on_original_inputs"].items()) + ".",
                  "Mask agreement with ours: " + ", ".join(f"{k} block 0 {v['block0']:.4f} / all {v['all']:.4f}"
                                                           for k, v in dg["mask_agreement_with_ours"].items()) + "."]
        sh = dg.get("same_hessian")
        if sh:
            lines.append(f"Our sparsegpt_prune on the Hessian llm-compressor's sequential pass saw for {sh['layer']}: "
                         f"mask agreement {sh['mask_agreement']:.4f}, rel. output error ours {sh['ours_rel_error']:.4f} "
                         f"vs peer {sh['peer_rel_error']:.4f}, weight diff {sh['weight_rel_diff']:.2e}.")
    return "\n".join(lines)


@click.command()
@click.option("--calib", type=int, default=64, help="calibration windows")
@click.option("--calib-len", type=int, default=128, help="tokens per calibration window")
@click.option("--ppl-windows", type=int, default=4, help="evaluation windows of 512 tokens per domain")
@click.option("--peer-pipelines", default="sequential,basic", help="llm-compressor pipelines to run (comma list)")
@click.option("--blocksize", type=int, default=128, help="SparseGPT column block size, both implementations")
@click.option("--damp", type=float, default=0.01, help="dampening fraction of mean diag(H), both implementations")
@click.option("--peer-venv", default="/work/peer-venv", type=click.Path(path_type=Path))
@click.option("--work", default=None, type=click.Path(path_type=Path), help="peer weights / windows cache folder")
@click.option("--out", default="benchmarks/results/peer-sparsegpt-smollm2.json", type=click.Path(path_type=Path))
@click.option("--quiet", is_flag=True)
def main(calib: int, calib_len: int, ppl_windows: int, peer_pipelines: str, blocksize: int, damp: float,
         peer_venv: Path, work: Path | None, out: Path, quiet: bool) -> None:
    set_quiet(quiet)
    py = peer_python(peer_venv)
    pipelines = [p.strip() for p in peer_pipelines.split(",") if p.strip()]
    if bad := [p for p in pipelines if p not in ("sequential", "basic")]:
        raise click.UsageError(f"--peer-pipelines: unknown {bad}; choose from sequential, basic")
    work = work or cache_dir() / "peer-sparsegpt"
    work.mkdir(parents=True, exist_ok=True)
    session = open_session("smollm2", CalibrationConfig(n=calib, length=calib_len, seed=0),
                           eval_cfg=EvalConfig(ppl_windows=1), evaluate=False)
    loaded = session.loaded
    targets = check_targets(session)
    probe = DomainProbe(loaded, EvalConfig(ppl_windows=ppl_windows))
    data: dict = {"model": "smollm2", "source": loaded.source, "threads": torch.get_num_threads(),
                  "original": probe.capture_original(loaded.model),
                  "settings": {"calib": calib, "calib_len": calib_len, "calib_seed": 0, "ppl_windows": ppl_windows,
                               "block_size": blocksize, "damp": damp, "blocks": len(targets) // len(PROJ),
                               "targets": len(targets)}, "rows": []}
    windows, digest = write_windows(session, work)
    data["settings"]["windows_sha256_16"] = digest
    ours = None
    for mode in ("original", "sequential"):  # sequential = llm-compressor's default pipeline, and ours (issue 21)
        log(f"ours: sparse24 --score sparsegpt --calib-mode {mode}")
        m, _, dt = compress_copy(session, "sparse24", 0.5, {"score": "sparsegpt", "sparsegpt_blocksize": blocksize,
                                                            "sparsegpt_damp": damp}, BlockwiseConfig(mode))
        data["rows"].append({"label": f"ours (sparse24 sparsegpt, --calib-mode {mode})", "quality": probe.score(m),
                             "prune_s": round(dt, 1), "structure": structure(loaded.model, m, targets)})
        if mode == "original":  # the diagnosis compares the one-pass Hessians
            ours = m
    peers: dict[str, nn.Module] = {}
    for p in pipelines:
        f = work / f"peer-{Path(loaded.source).name}-{digest}-{p}-b{blocksize}-d{damp:g}.safetensors"
        meta = run_peer(py, loaded.source, windows, f, p, blocksize, damp)
        data["peer_version"] = f"llmcompressor {meta['llmcompressor']} (compressed-tensors {meta['compressed-tensors']}, " \
                               f"transformers {meta['transformers']}, torch {meta['torch']})"
        peers[p] = load_peer(loaded.model, f)
        data["rows"].append({"label": f"llmcompressor SparseGPTModifier ({p} pipeline)", "quality": probe.score(peers[p]),
                             "prune_s": meta["prune_s"], "structure": structure(loaded.model, peers[p], targets),
                             "peer_meta": meta})
    data["diagnosis"] = diagnose(session, ours, peers, targets, blocksize, damp)
    out.parent.mkdir(parents=True, exist_ok=True)
    _save(out, json.dumps(data, indent=1, default=str))
    md = render(data)
    _save(out.with_suffix(".md"), md + "\n")
    print(md)


if __name__ == "__main__":
    main()
