"""`deploy`: the command-line entry point (click command group)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .attention import CHOICES as ATTENTION_CHOICES
from .build import BuildConfig, run_build
from .compress.base import MethodOption, all_methods, all_options, method_options
from .compress.calibration import CalibrationConfig
from .compress.quant import ALGOS
from .engines.quantize import MODES as QUANTIZE_MODES
from .engines.trt_module import BACKENDS
from .errors import UserError, disk_full
from .interrupts import Interrupted, signals_as_exceptions
from .models.registry import REGISTRY
from .ops import all_ops
from .passes.precision import PRECISIONS
from .pretrain import PretrainConfig, run_pretrain
from .pretrain.arch import ARCHS, PRESETS
from .progress import set_quiet
from .report import quality_verdict
from .ranges import Choice, DEVICE, SEED_MAX, Float, InPath, Int, OneLineUsageError, OutPath, Text, Triple
from .recover.adapters import ADAPTERS
from .recover.stage import RecoveryConfig
from .recover.blockwise import BlockwiseConfig, ReconstructConfig
from .serve.generate import SamplingConfig, check_new_tokens, open_folder


class _Group(click.Group):
    """Turns UserError (and a full disk) into one line on stderr and exit code 2, a signal into one
    line and exit code 128 + signum: never a traceback, and every clean-up runs first."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:  # an unknown command or group option: one line too
            raise OneLineUsageError(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            with signals_as_exceptions():
                return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:  # a value outside its range (ranges.py), an unknown option, ...
            raise OneLineUsageError(e) from None
        except UserError as e:
            click.echo(f"error: {e.message}", err=True)
            ctx.exit(2)
        except Interrupted as e:
            click.echo(f"error: {e}; partial output removed, --out unchanged", err=True)
            ctx.exit(e.exit_code)
        except Exception as e:
            full = disk_full(e)
            if full is None and isinstance(e, OSError):  # the last net: an OS refusal on a path the user gave
                full = os_error_line(e)
            if full is None:
                raise
            click.echo(f"error: {full.message}", err=True)
            ctx.exit(2)


def os_error_line(e: OSError) -> UserError:
    """An OSError that no check caught, as one line naming the path (every known case has its own check)."""
    where = " ".join(f"'{f}'" for f in (e.filename, getattr(e, "filename2", None)) if f is not None)
    return UserError(f"cannot use {where or 'a path'}: {e.strerror or type(e).__name__}",
                     "check the path names an existing, readable location (and, for outputs, a writable disk)")


@click.group(cls=_Group)
@click.version_option(package_name="factordeploy")
def main() -> None:
    """Compress a transformer into factorized layers and build a verified deployable artifact."""


def click_type(opt: MethodOption) -> Any:
    """A CLI-neutral method option as a click type (choices, ranges)."""
    if opt.choices is not None:
        return Choice(list(opt.choices))
    if opt.type is int:
        return Int(min=None if opt.min is None else int(opt.min) + (1 if opt.min_open else 0), max=opt.upper,
                   multiple_of=opt.multiple_of, one_of=opt.one_of)
    if opt.type is float:
        return Float(min=opt.min, max=opt.max, min_open=opt.min_open)
    if opt.type is str:
        return OutPath() if opt.path == "out" else InPath() if opt.path == "in" else Text()
    return opt.type


def _method_options(f):
    for opt in reversed(all_options()):
        f = click.option(f"--{opt.name}", opt.key, type=click_type(opt), default=None,
                         help=f"{opt.help} (default: {opt.default})")(f)
    return f


def _op_lowering_options(f):
    """One `--<flag>` per custom op that declares an ORT lowering flag (choices from the op's spec)."""
    for spec in all_ops().values():
        if spec.ort_flag:
            names = ", ".join(f"{lw.name} ({lw.doc})" for lw in spec.lowerings)
            f = click.option(f"--{spec.ort_flag}", f"ort_op_{spec.name}", type=Choice(list(spec.policies())),
                             default=spec.default_policy(), show_default=True,
                             help=f"how model.onnx (ONNX Runtime) runs {spec.name} nodes: cost = cheapest per layer by "
                                  f"the op's cost model, {spec.body_name} = standard-op body (compressed form kept)"
                                  + (f", {names}" if names else ""))(f)
    return f


_BLOCKWISE_KEYS = ("calib_mode", "reconstruct_steps", "reconstruct_lr", "reconstruct_mix", "reconstruct_adapter",
                   "reconstruct_checkpoint")


def _blockwise_options(f):
    """--calib-mode and --reconstruct-* (compress/sequential.py, recover/blockwise.py); read by `_blockwise_config`."""
    from .compress.sequential import CALIB_MODES

    opts = [
        click.option("--calib-mode", type=Choice(list(CALIB_MODES)), default="auto", show_default=True,
                     help="data-aware methods: calibrate every layer on the original model's activations, or block by "
                          "block on the compressed prefix's outputs (auto = the method's measured default)"),
        click.option("--reconstruct-steps", type=Int(0), default=0, show_default=True,
                     help="after compressing each block: closed-form refit, then N steps fitting the block's compressed "
                          "parameters to the original block's output (0 = off)"),
        click.option("--reconstruct-lr", type=Float(0.0, min_open=True), default=None,
                     help="block reconstruction learning rate [default: 1e-4 for the factors, 1e-3 for adapters]"),
        click.option("--reconstruct-mix", type=Float(0.0, 1.0), default=0.0, show_default=True,
                     help="weight of the term that feeds the ORIGINAL prefix's inputs to the compressed block"),
        click.option("--reconstruct-adapter", type=Choice(list(ADAPTERS)), default="none", show_default=True,
                     help="what block reconstruction trains: the factors themselves (none) or an adapter merged after"),
        click.option("--reconstruct-checkpoint", type=OutPath(), default=None,
                     help="folder for resumable block-reconstruction checkpoints (one per block); rerun to resume"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _blockwise_config(kw: dict, seed: int) -> BlockwiseConfig:
    v = {k: kw.pop(k) for k in _BLOCKWISE_KEYS}
    return BlockwiseConfig(v["calib_mode"], ReconstructConfig(
        steps=v["reconstruct_steps"], lr=v["reconstruct_lr"], mix=v["reconstruct_mix"], adapter=v["reconstruct_adapter"],
        checkpoint=v["reconstruct_checkpoint"], seed=seed))


@main.command()
@click.option("--model", type=InPath("dir"), default="minilm", show_default=True, help="registry name (see `deploy models`) or a local HF folder")
@click.option("--method", type=Text(), default="svd", show_default=True, help="compression method (see `deploy methods`)")
@click.option("--ratio", type=Float(0.0, 1.0, min_open=True, max_open=True, phrase="between 0 and 1 (exclusive)"), default=0.5, show_default=True,
              help="fraction of the targeted layers' stored bytes to remove, 0 < ratio < 1")
@click.option("--out", type=OutPath(), default=None, help="output folder [default: build/<model>-<method>]")
@click.option("--overwrite", is_flag=True,
              help="replace an existing --out that deploy did not write (a folder deploy wrote is replaced anyway)")
@click.option("--device", type=DEVICE, default="cpu", show_default=True, help="cpu or cuda")
@click.option("--seed", type=Int(0, SEED_MAX), default=0, show_default=True)
@click.option("--calib", type=Int(1), default=128, show_default=True, help="calibration samples")
@click.option("--calib-len", type=Int(8), default=128, show_default=True,
              help="tokens per calibration sample (at most the model's position table)")
@click.option("--calib-data", type=InPath("file"), default=None, help="your own calibration text (.txt or .jsonl)")
@click.option("--calib-cache", default=None, type=OutPath(),
              help="folder where calibration statistics are kept and reused by later builds of the same model and --calib settings")
@click.option("--targets", type=Text(), default="*", show_default=True, help="comma-separated glob patterns of linears to compress")
@click.option("--no-eval", is_flag=True, help="skip the task-quality evaluation")
@click.option("--no-baseline", is_flag=True, help="skip the original-model ONNX (no latency comparison)")
@click.option("--quiet", is_flag=True, help="no progress output")
@click.option("--backend", type=Choice(list(BACKENDS)), default="auto", show_default=True,
              help="engine: TensorRT, TensorRT-RTX, or ONNX Runtime only; auto = a TensorRT that can run on this GPU, else ORT")
@click.option("--precision", type=Choice(list(PRECISIONS)), default="fp32", show_default=True,
              help="compute precision of the TensorRT graph (model.onnx stays fp32)")
@click.option("--sparse-weights", is_flag=True, help="let TensorRT use 2:4 sparse kernels (SPARSE_WEIGHTS)")
@click.option("--format", "fmt", type=Choice(["onnx", "triton"]), default="onnx", show_default=True,
              help="triton: also write a Triton model repository into OUT/triton (see `deploy export-triton`)")
@click.option("--quantize", type=Choice(list(QUANTIZE_MODES)), default="none", show_default=True,
              help="w8/w4/w2: weight-only block quantization of every stored factor (low-rank factors, 2:4 values, "
                   "dense linears; MatMulNBits for ONNX Runtime, QDQ for TensorRT), counted in the bytes; "
                   "int8: ONNX Runtime dynamic int8 of model.onnx")
@click.option("--quant-block", type=Int(16, 4096, power_of_two=True), default=32, show_default=True,
              help="weight-only quantization: codes per scale along the reduction dim (power of two, 16..4096)")
@click.option("--quant-asym", is_flag=True, help="weight-only: asymmetric codes with zero points (ONNX Runtime only)")
@click.option("--quant-algo", type=Choice(list(ALGOS)), default="rtn", show_default=True,
              help="weight-only: rtn (ONNX Runtime's own quantizer) or gptq (calibration output error)")
@click.option("--quantize-head", is_flag=True, help="weight-only: also store the LM head (at the --quantize bits) and the token-embedding table quantized")
@click.option("--embedding-bits", type=Choice(["8", "4"]), default="8", show_default=True,
              help="with --quantize-head: the token-embedding table at 8 bits (one scale per row) or 4 bits (--quant-block blocks)")
@click.option("--batch", "trt_batch", type=Triple(), default="1:8:32", show_default=True, help="TensorRT profile batch min:opt:max")
@click.option("--seq", "trt_seq", type=Triple(), default="1:128:512", show_default=True,
              help="TensorRT profile sequence min:opt:max (max at most the model's position table)")
@click.option("--recover-steps", type=Int(0), default=0, show_default=True,
              help="recovery training steps after compression (distillation from the original model); 0 = off")
@click.option("--adapter", type=Choice(list(ADAPTERS)), default="lora", show_default=True,
              help="what recovery trains: adapters merged into every factor before export, or none = the factors themselves")
@click.option("--adapter-rank", type=Int(1), default=8, show_default=True, help="adapter rank (at most the model's narrowest linear width)")
@click.option("--adapter-dense", is_flag=True, help="also adapt linears left dense (never the LM head)")
@click.option("--recover-lr", type=Float(0.0, min_open=True), default=None,
              help="recovery learning rate [default: adapters 1e-3 (decoder) / 2e-3 (encoder); none 1e-5 / 1e-4]")
@click.option("--recover-batch", type=Int(1), default=4, show_default=True, help="windows per step")
@click.option("--recover-data", type=Text(), default="generated", show_default=True,
              help="generated (the teacher writes text, mixed with the calibration split), wiki, or a .txt/.jsonl FILE")
@click.option("--recover-samples", type=Int(1), default=256, show_default=True,
              help="training windows of --calib-len tokens")
@click.option("--recover-temperature", type=Float(0.0, min_open=True), default=1.0, show_default=True,
              help="distillation temperature (decoders)")
@click.option("--recover-hidden-weight", type=Float(0.0), default=0.0, show_default=True,
              help="decoders: weight of a last-hidden-state distillation term beside the next-token KL")
@click.option("--recover-checkpoint", type=OutPath(), default=None,
              help="folder for the resumable recovery checkpoint; rerunning the same command resumes from it")
@click.option("--attention", default="full", show_default=True, type=Choice(list(ATTENTION_CHOICES)),
              help="replace every self-attention core with Combiner structured attention (sub-quadratic)")
@click.option("--attention-block", type=Int(0), default=0,
              help="Combiner block (local window) size [default: about sqrt of the --seq opt length]")
@_op_lowering_options
@_blockwise_options
@_method_options
def build(model, method, ratio, out, overwrite, device, seed, calib, calib_len, calib_data, calib_cache, targets, no_eval, no_baseline,
          quiet, backend, precision, sparse_weights, fmt, quantize, quant_block, quant_asym, quant_algo, quantize_head, embedding_bits, trt_batch, trt_seq, recover_steps, adapter,
          adapter_rank, adapter_dense, recover_lr, recover_batch, recover_data, recover_samples, recover_temperature,
          recover_hidden_weight, recover_checkpoint, attention, attention_block, **method_opts):
    """Compress MODEL with METHOD, export ONNX, run passes, verify, and write OUT/report.md."""
    ort_lowering = {k[len("ort_op_"):]: method_opts.pop(k) for k in list(method_opts) if k.startswith("ort_op_")}
    blockwise = _blockwise_config(method_opts, seed)
    set_quiet(quiet)
    if calib < 1 or calib_len < 8:
        raise UserError("--calib must be >= 1 and --calib-len >= 8", "pass e.g. --calib 128 --calib-len 128")
    options = method_options(method, method_opts)
    cfg = BuildConfig(model=model, method=method, ratio=ratio, out=out or f"build/{model.replace('/', '_')}-{method}", overwrite=overwrite,
                      device=device, seed=seed, options=options,
                      calib=CalibrationConfig(n=calib, length=calib_len, seed=seed, text_file=calib_data),
                      include=tuple(p.strip() for p in targets.split(",") if p.strip()),
                      evaluate=not no_eval, baseline=not no_baseline, backend=backend, precision=precision,
                      sparse_weights=sparse_weights, ort_lowering=ort_lowering, trt_batch=trt_batch, trt_seq=trt_seq,
                      quantize=quantize, quant_block=quant_block, quant_sym=not quant_asym, quant_algo=quant_algo,
                      quantize_head=quantize_head, embedding_bits=int(embedding_bits), calib_cache=calib_cache, attention=attention, attention_block=attention_block,
                      recovery=RecoveryConfig(steps=recover_steps, adapter=adapter, rank=adapter_rank, lr=recover_lr,
                                              batch=recover_batch, data=recover_data, checkpoint=recover_checkpoint,
                                              samples=recover_samples, seq_len=calib_len,
                                              temperature=recover_temperature, hidden_weight=recover_hidden_weight,
                                              include_dense=adapter_dense, seed=seed),
                      blockwise=blockwise)
    res = run_build(cfg)
    r = res.report
    click.echo(f"built {res.out}/model.onnx: targeted bytes -{r.size.targeted_reduction * 100:.1f}%, "
               f"export check {'passed' if r.fidelity.passed else 'FAILED'} (max abs {r.fidelity.max_abs:.2g})")
    click.echo(quality_verdict(r.model["kind"], r.quality))
    q = r.quantize
    if q and q.get("mode") == "int8":
        click.echo(f"int8 artifact: {q['bytes_before'] / 1e6:.1f} -> {q['bytes_after'] / 1e6:.1f} MB "
                   f"({q['matmuls_quantized']}/{q['matmuls_total']} MatMuls int8), check "
                   f"{'passed' if q['fidelity']['passed'] else 'FAILED'} (mean abs {q['fidelity']['mean_abs']:.2g} <= {q['fidelity']['atol']})")
    e = r.engine
    if e is not None and e.result is not None:
        x = e.result
        click.echo(f"engine ({e.backend}, {e.precision}): {res.out}/{x.engine_path} {x.engine_bytes / 1e6:.2f} MB, "
                   f"{x.layers} layers, built in {x.build_seconds:.1f} s; executed: {'yes' if x.executed else 'no'} ({x.reason})")
    elif e is not None:
        click.echo(f"backend: {e.backend} ({e.reason})")
    if fmt == "triton":
        from .cli_serving import echo_repository
        from .serve.triton import write_repository

        echo_repository(res.out / "triton", write_repository(res.out, r.to_dict(), res.out / "triton"))
    elif q and "layers_quantized" in q:
        click.echo(f"weight-only {q['mode'] if q['mode'] != 'none' else '(LM head / table)'}: {q['layers_quantized']} layers, block-linear bytes "
                   f"{q['bytes_before'] / 1e6:.2f} -> {q['bytes_after'] / 1e6:.2f} MB; "
                   + (f"embedding table {q['embedding']['bytes_before'] / 1e6:.1f} -> {q['embedding']['bytes_after'] / 1e6:.1f} MB ({q['embedding']['form']}); "
                      if q.get("embedding") else "") + f"model.onnx {q.get('model_onnx_bytes', 0) / 1e6:.1f} MB")
    if not r.fidelity.passed or (q and "fidelity" in q and not q["fidelity"]["passed"]):
        sys.exit(1)


@main.command()
@click.argument("folder", type=InPath("dir"))
@click.option("--prompt", "prompts", type=Text(), multiple=True, required=True, help="prompt text (repeat for several prompts)")
@click.option("--max-new-tokens", type=Int(1), default=32, show_default=True)
@click.option("--sample", is_flag=True, help="sample instead of greedy decoding")
@click.option("--temperature", type=Float(0.0, min_open=True), default=1.0, show_default=True, help="with --sample")
@click.option("--top-p", type=Float(0.0, 1.0, min_open=True), default=1.0, show_default=True, help="with --sample: nucleus mass kept")
@click.option("--seed", type=Int(0, SEED_MAX), default=0, show_default=True, help="with --sample")
@click.option("--model-file", type=Text(), default="model.onnx", show_default=True, help="the ONNX file in FOLDER (e.g. model.int8.onnx)")
@click.option("--threads", type=Int(0, 1024), default=0, show_default=True, help="ONNX Runtime intra-op threads (0 = ORT default)")
@click.option("--ignore-eos", is_flag=True, help="always generate --max-new-tokens tokens")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object per prompt (ids, text, timings)")
def generate(folder, prompts, max_new_tokens, sample, temperature, top_p, seed, model_file, threads, ignore_eos, as_json):
    """Generate text from a built decoder FOLDER with ONNX Runtime and its KV cache."""
    import json


    check_new_tokens(folder, max_new_tokens)
    served = open_folder(folder, model_file=model_file, threads=threads)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p,
                         seed=seed, eos_ids=served.eos_ids, ignore_eos=ignore_eos)
    cfg.check()
    served.check_prompts(prompts, max_new_tokens)
    for prompt in prompts:
        g = served.generate(prompt, cfg)
        if as_json:
            click.echo(json.dumps({"prompt": prompt, **g.as_dict()}))
            continue
        click.echo(prompt + g.text)
        click.echo(f"[{len(g.new_ids)} tokens, prefill {g.prefill_s * 1e3:.0f} ms ({len(g.prompt_ids)} tokens), "
                   f"{g.tokens_per_s:.1f} tokens/s ({served.runner.name})]", err=True)


@main.command()
def methods() -> None:
    """List compression methods and their options."""
    rows = all_methods()
    width = max(len(n) for n in rows)
    for name, cls in rows.items():
        click.echo(f"{name.ljust(width)}  {cls.summary}")
        for o in cls.options:
            click.echo(f"{''.ljust(width)}    --{o.name} (default {o.default}): {o.help}")


@main.command()
def models() -> None:
    """List packaged models; any local Hugging Face folder also works as --model PATH."""
    for name, (desc, _) in REGISTRY.items():
        click.echo(f"{name.ljust(8)}  {desc}")
    click.echo("PATH      any local Hugging Face folder (encoder, or causal LM) - e.g. --model ./my-bert")


@main.command()
@click.option("--arch", type=Choice(list(ARCHS)), default="llama", show_default=True, help="architecture family (llama)")
@click.option("--params", "size", type=Choice(list(PRESETS)), default="20M", show_default=True, help="model size preset: tiny, 20M, 60M")
@click.option("--param", "param", type=Choice(["dense", "lowrank", "sltrain", "lost"]), default="dense",
              show_default=True, help="weight parametrisation of the attention/MLP linears")
@click.option("--tokens", type=Int(1), default=200_000, show_default=True, help="training tokens")
@click.option("--out", type=OutPath(), required=True, help="folder for the trained Hugging Face model (must not exist or be empty)")
@click.option("--seq-len", type=Int(8, 8192), default=128, show_default=True)
@click.option("--batch", type=Int(1), default=8, show_default=True)
@click.option("--lr", type=Float(0.0, min_open=True), default=None,
              help="AdamW peak lr (default: 3e-3 for sltrain as in its paper, 1e-3 otherwise)")
@click.option("--rank", type=Int(1), default=None, help="r of the factorized forms (default: the preset's, d/4)")
@click.option("--alpha", type=Float(0.0, min_open=True), default=32.0, show_default=True, help="SLTrain's alpha (low-rank scale alpha/r)")
@click.option("--delta", type=Float(0.0, 1.0, min_open=True, max_open=True), default=0.03, show_default=True,
              help="SLTrain's density of S; LOST's channel fraction")
@click.option("--gamma", type=Float(0.0, 1.0, min_open=True, max_open=True), default=0.5, show_default=True, help="LOST's mixing weight")
@click.option("--eval-windows", type=Int(1), default=16, show_default=True,
              help="held-out windows per domain (wiki, news, pydoc)")
@click.option("--eval-every", type=Int(0), default=0, help="steps between held-out evaluations (0: ~8 per run)")
@click.option("--checkpoint", type=OutPath(), default=None, help="folder for the loop's checkpoint; rerunning resumes from it")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=Int(0, SEED_MAX), default=0, show_default=True)
@click.option("--quiet", is_flag=True)
def pretrain(arch, size, param, tokens, out, seq_len, batch, lr, rank, alpha, delta, gamma, eval_windows, eval_every,
             checkpoint, device, seed, quiet) -> None:
    """Pretrain a small LLaMA from scratch (dense / low-rank / SLTrain / LOST) into a HF folder."""
    set_quiet(quiet)
    res = run_pretrain(PretrainConfig(out=out, arch=arch, params=size, param=param, tokens=tokens, seq_len=seq_len,
                                      batch=batch, lr=lr, rank=rank, alpha=alpha, delta=delta, gamma=gamma,
                                      eval_windows=eval_windows, eval_every=eval_every, seed=seed, device=device,
                                      checkpoint=checkpoint))
    click.echo(json.dumps({"out": out, "param": param, "params": res.model_params, "steps": res.steps,
                           "tokens": res.tokens, "perplexity": res.perplexity}))


def _add_folder_commands() -> None:
    from .cli_serving import COMMANDS

    for cmd in COMMANDS:
        main.add_command(cmd)


_add_folder_commands()

if __name__ == "__main__":  # pragma: no cover
    main()
