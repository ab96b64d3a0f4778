"""`deploy inspect`, `deploy verify`, `deploy export-triton`, `deploy sweep`: commands on build folders.

Defined here (cli.py adds them to the `deploy` group) so the build command and these grow apart.
"""

from __future__ import annotations

import json
import sys

import click

from .errors import UserError
from .outdir import check_writable_folder
from .ranges import Choice, SEED_MAX, Float, FloatList, InPath, Int, OutPath, Text


@click.command("inspect")
@click.argument("folder", type=InPath("dir"))
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
def inspect_cmd(folder: str, as_json: bool) -> None:
    """Summarize one build FOLDER: layers, bytes, ranks, files and the checks it ran."""
    from .serve.folder import open_build_folder
    from .serve.inspect import render, summarize

    s = summarize(open_build_folder(folder))
    click.echo(json.dumps(s, indent=2, default=str) if as_json else render(s))
    if not s["graph"]["consistent"]:
        sys.exit(1)


@click.command("verify")
@click.argument("folder", type=InPath("dir"))
@click.option("--domain", type=Choice(["wiki", "news", "pydoc"]), default="wiki", show_default=True,
              help="text to check on: wiki (held-out, in domain), news or pydoc (out of domain)")
@click.option("--seed", type=Int(0, SEED_MAX), default=1, show_default=True, help="which inputs to draw (the build used its own)")
@click.option("--samples", type=Int(1, 100_000), default=None, help="sentences (encoders, default 128) or windows (decoders, default 4)")
@click.option("--tolerance", type=Float(0.0), default=0.05, show_default=True,
              help="allowed drop against the build's recorded quality (cosine) / relative perplexity-ratio rise")
@click.option("--min-cosine", type=Float(-1.0, 1.0), default=None, help="encoders: fixed threshold instead of the recorded figure")
@click.option("--max-ppl-ratio", type=Float(0.0, min_open=True), default=None, help="decoders: fixed threshold instead of the recorded figure")
@click.option("--original", type=InPath("dir"), default=None, help="the original model (registry name or folder) if the report's source moved")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("--quiet", is_flag=True, help="no progress output")
def verify_cmd(folder, domain, seed, samples, tolerance, min_cosine, max_ppl_ratio, original, as_json, quiet) -> None:
    """Re-check an existing build FOLDER on new inputs; exits 1 when a check fails."""
    from .progress import set_quiet
    from .serve.folder import open_build_folder
    from .verify.folder_check import VerifyConfig, render, verify_folder
    from .verify.domains import DomainSample

    set_quiet(quiet)
    if samples is not None and samples < 1:
        raise UserError("--samples must be >= 1", "pass e.g. --samples 64")
    if original is not None:
        check_model_name(original, "--original")
    bf = open_build_folder(folder)
    kind = bf.report["model"]["kind"]
    sample = DomainSample(domain=domain, seed=seed)
    if samples is not None:
        sample = DomainSample(domain=domain, seed=seed, **({"sentences": samples} if kind == "encoder" else {"windows": samples}))
    res = verify_folder(bf, VerifyConfig(sample, tolerance, min_cosine, max_ppl_ratio, original))
    click.echo(json.dumps(res, indent=2) if as_json else render(res))
    if not res["passed"]:
        sys.exit(1)


@click.command("export-triton")
@click.argument("folder", type=InPath("dir"))
@click.option("--out", type=OutPath(), default=None, help="repository folder [default: FOLDER/triton]")
@click.option("--name", type=Text(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", what="a Triton model name (letters, digits, _ . -; not starting with . or -)"), default=None, help="Triton model name [default: <model>_<method>_r<ratio>]")
@click.option("--max-batch", type=Int(0), default=32, show_default=True, help="max_batch_size (0: no batching)")
def export_triton_cmd(folder: str, out: str | None, name: str | None, max_batch: int) -> None:
    """Write a Triton Inference Server model repository from a build FOLDER (validated with Triton's schema)."""
    from pathlib import Path

    from .serve.folder import open_build_folder
    from .serve.triton import write_repository

    if max_batch < 0:
        raise UserError("--max-batch must be >= 0", "pass e.g. --max-batch 32, or 0 for no batching")
    if out:
        check_writable_folder(out, "--out")
    bf = open_build_folder(folder)
    repo = Path(out) if out else bf.path / "triton"
    echo_repository(repo, write_repository(bf.path, bf.report, repo, name=name, max_batch=max_batch))


def check_model_name(name: str, flag: str) -> None:
    """A registry name or an existing model folder, before any work (the folder's contents are checked on load)."""
    from pathlib import Path

    from .models.registry import REGISTRY

    if name in REGISTRY:
        return
    p = Path(name)
    if p.is_file():
        raise UserError(f"{flag} {name} is a file", "pass the model folder that holds config.json, or a registry name")
    if not p.is_dir():
        raise UserError(f"{flag} {name}: no such model folder or registry name",
                        f"pass a local Hugging Face folder or one of {', '.join(REGISTRY)}")


def echo_repository(repo, manifest: dict) -> None:
    for m in manifest["models"]:
        click.echo(f"triton model {repo}/{m['name']} ({m['platform']}, max_batch_size {m['max_batch_size']}, "
                   f"{len(m['inputs'])} inputs, {len(m['outputs'])} outputs)")
    click.echo(f"tensorrt_plan: {manifest['tensorrt_plan']}")
    click.echo(f"validated {len(manifest['validated'])} config.pbtxt with {manifest['validated_with']}")


@click.command("sweep")
@click.option("--model", type=InPath("dir"), default="minilm", show_default=True, help="registry name or local HF folder")
@click.option("--methods", type=Text(), default="svd,svd-whiten,cospadi", show_default=True, help="comma-separated methods")
@click.option("--ratios", type=FloatList(Float(0.0, 1.0, min_open=True, max_open=True)), default="0.35,0.5", show_default=True, help="comma-separated ratios")
@click.option("--budgets", type=FloatList(Float(0.0, 1.0, min_open=True)), default="0.1562,0.25", show_default=True,
              help="with auto among --methods: its --budget per cell (stored bytes of the targeted layers / fp32; 0.1562 = w4-g32's)")
@click.option("--out", type=OutPath(), required=True, help="sweep folder (re-running resumes: finished cells are kept)")
@click.option("--seed", type=Int(0, SEED_MAX), default=0, show_default=True)
@click.option("--calib", type=Int(1), default=128, show_default=True, help="calibration samples (shared by all cells)")
@click.option("--calib-len", type=Int(8), default=128, show_default=True, help="tokens per calibration sample")
@click.option("--calib-mode", type=Choice(["auto", "original", "sequential"]), default="auto", show_default=True,
              help="auto = each method's default; original = every cell shares one store of calibration statistics")
@click.option("--backend", type=Choice(["auto", "trt", "trt-rtx", "ort"]), default="ort", show_default=True)
@click.option("--anchors", type=Text(), default="ort-w8,ort-w4", show_default=True,
              help="ONNX Runtime's own weight-only quantizer on the original, scored beside the cells "
                   "(comma-separated from ort-w8, ort-w4; '' for none)")
@click.option("--quiet", is_flag=True, help="no progress output")
def sweep_cmd(model, methods, ratios, budgets, out, seed, calib, calib_len, calib_mode, backend, anchors, quiet) -> None:
    """Build every METHOD x RATIO cell of MODEL (auto: x BUDGET); write a table (Markdown + JSON) and Pareto plots (PNG)."""
    from .compress.calibration import CalibrationConfig
    from .progress import set_quiet
    from .sweep import SweepConfig, run_sweep

    set_quiet(quiet)
    check_model_name(model, "--model")
    check_writable_folder(out, "--out")
    try:
        rs = tuple(float(r) for r in ratios.split(",") if r.strip())
    except ValueError as e:
        raise UserError(f"--ratios '{ratios}' is not a comma-separated list of numbers", "pass e.g. --ratios 0.35,0.5") from e
    bs = tuple(float(b) for b in budgets.split(",") if b.strip())
    ms = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not ms or not rs:
        raise UserError("--methods and --ratios need at least one entry each", "pass e.g. --methods svd --ratios 0.5")
    if calib < 1 or calib_len < 8:
        raise UserError("--calib must be >= 1 and --calib-len >= 8", "pass e.g. --calib 128 --calib-len 128")
    an = tuple(a.strip() for a in anchors.split(",") if a.strip())
    res = run_sweep(SweepConfig(model=model, methods=ms, ratios=rs, budgets=bs, out=out, seed=seed, backend=backend, anchors=an,
                                calib_mode=calib_mode, calib=CalibrationConfig(n=calib, length=calib_len, seed=seed)))
    click.echo(f"sweep {out}: {len(res.rows)} cells ({res.built} built now, {res.reused} reused); "
               f"table {res.table_md}; plots {', '.join(str(p) for p in res.plots)}")


COMMANDS = (inspect_cmd, verify_cmd, export_triton_cmd, sweep_cmd)
