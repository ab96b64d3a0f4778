"""Block-wise compression: `--calib-mode sequential` and the hook for `--reconstruct-steps`.

`original` (the former behaviour): every layer is calibrated on the ORIGINAL model's activations,
so no later layer ever sees the errors of the compressed layers before it. `sequential` (SparseGPT
/ GPTQ's order): the transformer blocks are found generically (the `nn.ModuleList` holding the
most targeted layers), the calibration windows are run once up to the first block, and then,
block after block, that block's layer-input Grams are collected by running ONLY that block on the
inputs that the already-compressed prefix produced; the method compresses that block's targets
with those Grams (through a `BlockCalibration`, so every method that asks
`ctx.calibration.grams(model, names)` works unchanged); the compressed block then maps the
inputs to the next block's inputs. Memory: one block's activations for the calibration windows
(N x L x hidden floats; x2 plus the original stream when reconstructing), kept batch by batch.

A unit is one block, or `method.sequential_unit(options)` consecutive blocks (CoSpaDi with
`--share group`: the blocks that share a dictionary are compressed together). Global decisions
(rank allocation across layers: `--allocation welore|measured`) are made once on the original
statistics by `method.plan` before the first block, then every unit uses them.

After each unit, an optional `reconstruct(UnitData) -> dict` (recover/blockwise.py, wired by the
build's compress stage; compress/ never imports recover/) may change the unit's compressed
parameters, given its inputs from the compressed prefix and the ORIGINAL unit's outputs on the
original prefix's inputs. The next unit then sees the reconstructed unit's outputs.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UserError
from ..progress import log
from .calibration import GramHooks

CALIB_MODES = ("auto", "original", "sequential")
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


@dataclass
class BlockInput:
    """One calibration batch at a block boundary: the hidden states and the block's other arguments."""

    hidden: torch.Tensor
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    key: str | None = None  # hidden passed by keyword (None = first positional argument)


def call_block(block: nn.Module, x: torch.Tensor, inp: BlockInput) -> torch.Tensor:
    out = block(*inp.args, **(inp.kwargs | {inp.key: x})) if inp.key else block(x, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def run_blocks(blocks: list[nn.Module] | nn.ModuleList, x: torch.Tensor, inp: BlockInput) -> torch.Tensor:
    for b in blocks:
        x = call_block(b, x, inp)
    return x


@dataclass
class Blocks:
    prefix: str  # e.g. "encoder.layer", "model.layers"
    blocks: nn.ModuleList
    targets: dict[int, list[str]]  # block index -> its targeted layers (model names)
    outside: list[str]  # targeted layers in no block


def find_blocks(model: nn.Module, targets: list[str]) -> Blocks:
    """The ModuleList of transformer blocks: the one whose numbered children hold the most targets."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(1 for t in targets if t.startswith(name + "."))
            if n and (best is None or n > best[0]):
                best = (n, name, mod)
    if best is None:
        raise UserError("no transformer blocks (an nn.ModuleList holding the targeted layers) found",
                        "use --calib-mode original and --reconstruct-steps 0 for this model")
    _, prefix, blocks = best
    per: dict[int, list[str]] = {}
    outside = []
    for t in targets:
        rest = t[len(prefix) + 1:] if t.startswith(prefix + ".") else None
        head = rest.split(".", 1)[0] if rest else None
        if head is not None and head.isdigit():
            per.setdefault(int(head), []).append(t)
        else:
            outside.append(t)
    return Blocks(prefix, blocks, dict(sorted(per.items())), outside)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(calibration: Any, model: nn.Module, block: nn.Module) -> list[BlockInput]:
    """Every calibration batch's input to `block` (the model runs only up to it)."""
    caught: list[BlockInput] = []

    def pre(_mod, args, kwargs):
        kw = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
        if args:
            caught.append(BlockInput(args[0].detach(), tuple(args[1:]), kw))
        else:
            caught.append(BlockInput(kw.pop("hidden_states").detach(), (), kw, "hidden_states"))
        raise _Stop

    h = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model.eval()
        for batch in calibration.batches():
            try:
                calibration.loaded.output(model, batch)
            except _Stop:
                pass
    finally:
        h.remove()
    return caught


@torch.no_grad()
def unit_grams(model: nn.Module, blocks: list[nn.Module], names: list[str], xs: list[torch.Tensor],
               inputs: list[BlockInput]) -> dict[str, torch.Tensor]:
    """X^T X of each named layer's input with the unit run on `xs` (same-input layers share one tensor)."""
    with GramHooks({n: model.get_submodule(n) for n in names}) as hooks:
        for x, inp in zip(xs, inputs):
            run_blocks(blocks, x, inp)
            hooks.next_batch()
    return hooks.grams(names)


class BlockCalibration:
    """The calibration a method sees for one unit: Grams from the compressed prefix, the rest delegated."""

    def __init__(self, base: Any, grams: dict[str, torch.Tensor]) -> None:
        self.base = base
        self._block_grams = grams

    def grams(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self._block_grams]
        if missing:
            raise RuntimeError(f"sequential calibration has no statistics for {missing[:3]} in this unit")
        return {n: self._block_grams[n] for n in names}

    def __getattr__(self, name: str) -> Any:  # windows, batches, cache, config, loaded, describe ...
        return getattr(self.base, name)


@dataclass
class UnitData:
    """What a reconstruction hook gets for one unit (all tensors on the build's device)."""

    index: int
    block_indices: list[int]
    names: list[str]
    compressed: nn.ModuleList  # the unit's blocks inside the model (changed in place)
    original: nn.ModuleList  # copies of the unit's ORIGINAL blocks
    inputs: list[BlockInput]  # per batch: the compressed prefix's output (hidden) + the block's arguments
    original_inputs: list[torch.Tensor]  # per batch: the original prefix's output
    targets: list[torch.Tensor]  # per batch: the original unit on original_inputs


Reconstruct = Callable[[UnitData], dict]


def compress_blockwise(method: Any, model: nn.Module, targets: list[str], ctx: Any, mode: str,
                       reconstruct: Reconstruct | None = None) -> Any:
    """Compress `targets` unit by unit (see the module doc); returns the method's CompressResult type."""
    from .base import CompressResult  # same layer; base imports nothing from here

    calib = ctx.require_calibration()
    found = find_blocks(model, targets)
    t0 = time.perf_counter()
    plan_ctx = ctx
    if mode == "original":  # every Gram from the ORIGINAL model, before any layer changes
        calib.grams(model, targets)
    ctx = dataclasses.replace(ctx, plan=method.plan(model, targets, plan_ctx) or {})
    records, notes, extra_units = [], [], []
    if found.outside:  # e.g. a projection outside the block stack: calibrated on the original model
        r = method.compress(model, found.outside, ctx)
        records += r.layers
        notes.append(f"{len(found.outside)} targeted layer(s) outside the blocks compressed on the original model's statistics")
    unit = max(1, int(method.sequential_unit(ctx.options)))
    idx = list(found.targets)
    units = [idx[i:i + unit] for i in range(0, len(idx), unit)]
    first_block = found.blocks[idx[0]] if idx else None
    inputs = capture_inputs(calib, model, first_block) if first_block is not None else []
    xs = [i.hidden for i in inputs]
    x_orig = list(xs)
    need_orig = reconstruct is not None
    last: Any = None
    covered = 0
    for u, bidx in enumerate(units):
        # blocks between units without targets still carry the stream forward
        while covered < bidx[0]:
            b = found.blocks[covered]
            xs = _advance([b], xs, inputs)
            if need_orig:
                x_orig = _advance([b], x_orig, inputs)
            covered += 1
        blocks = [found.blocks[b] for b in bidx]
        names = [n for b in bidx for n in found.targets[b]]
        original = nn.ModuleList(copy.deepcopy(b) for b in blocks) if need_orig else None
        if mode == "sequential":
            sub = dataclasses.replace(ctx, calibration=BlockCalibration(calib, unit_grams(model, blocks, names, xs, inputs)))
        else:
            sub = ctx
        last = method.compress(model, names, sub)
        records += last.layers
        if need_orig:
            with torch.no_grad():
                ys = [run_blocks(original, x, i) for x, i in zip(x_orig, inputs)]
            info = reconstruct(UnitData(u, bidx, names, nn.ModuleList(blocks), original,
                                        [dataclasses.replace(i, hidden=x) for i, x in zip(inputs, xs)], x_orig, ys))
            extra_units.append({"unit": u, "blocks": bidx, **info})
            x_orig = ys
            del original
        xs = _advance(blocks, xs, inputs)
        covered = bidx[-1] + 1
        log(f"blockwise ({mode}): unit {u + 1}/{len(units)} (blocks {bidx[0]}-{bidx[-1]}) done, "
            f"{time.perf_counter() - t0:.0f}s")
    order = {n: i for i, n in enumerate(targets)}
    records.sort(key=lambda r: order.get(r.name, len(order)))
    notes = (list(last.notes) if last is not None else []) + notes
    notes.append(f"calibration {mode}: {len(units)} unit(s) of {unit} block(s) under {found.prefix}"
                 + (", each layer's Grams from the compressed prefix's outputs" if mode == "sequential" else
                    ", Grams from the original model")
                 + (f"; block-wise reconstruction after each unit" if reconstruct is not None else ""))
    extra = dict(last.extra) if last is not None else {}
    extra["blockwise"] = {"calib_mode": mode, "units": len(units), "blocks_per_unit": unit,
                          "seconds": round(time.perf_counter() - t0, 2), "reconstruction": extra_units}
    return CompressResult(records, notes=notes, extra=extra)


@torch.no_grad()
def _advance(blocks: list[nn.Module], xs: list[torch.Tensor], inputs: list[BlockInput]) -> list[torch.Tensor]:
    return [run_blocks(blocks, x, i).detach() for x, i in zip(xs, inputs)]
