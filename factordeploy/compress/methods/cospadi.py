"""`cospadi`: calibration-guided sparse dictionary compression (CoSpaDi, arXiv 2509.22075).

Each targeted linear W (out x in) becomes S @ D: a dense dictionary D of k atoms in the
input space and s-sparse codes per output neuron (layers.SparseDictLinear), fitted to the
calibration output error ||X W^T - X (S D)^T|| through Gram whitening (linalg.gram_factor,
the same helper as whitened SVD) and dictionary learning (compress/dictlearn.py).

* `--share none`: one dictionary per layer. `--share group`: one dictionary per group of
  projections that read the same input (q/k/v, or gate/up) across `--share-blocks`
  consecutive blocks, with per-layer codes; the dictionary's bytes are charged once.
* (k, s): `--atoms`/`--sparsity`, or per layer (group) the candidate within the byte budget
  with the lowest calibration error after a short screen. Every stored byte counts: D, the
  code values, and the code indices at their real width (uint8 up to 256 atoms, else int16).
* Never worse than whitened SVD: each layer (group) is compared with the whitened SVD of the
  same byte budget on the calibration Grams, and the SVD factors are kept when they win.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..base import CompressContext, CompressResult, Method, MethodOption, register, replace_layer
from ..budget import uniform_rank
from ..dictlearn import DictFit, candidate_pairs, fit_dictionary, index_bytes, whitened_sq_spectrum
from ..layers import LowRankLinear, SparseDictLinear
from ..linalg import gram_factor, whitened_svd
from ...errors import UserError
from ...ranges import BLOCKS, WIDEST
from ...progress import track

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.*)$")


@dataclass
class Group:
    """Layers fitted with one dictionary (a single layer unless --share group)."""

    key: str
    names: list[str]


def split_block(name: str) -> tuple[str, int, str] | None:
    """'encoder.layer.3.attention.self.query' -> ('encoder.layer', 3, 'attention.self.query')."""
    m = _BLOCK.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def make_groups(model: nn.Module, targets: list[str], grams: dict[str, torch.Tensor], share: str,
                share_blocks: int) -> list[Group]:
    """Per-layer groups, or groups of same-input projections over `share_blocks` blocks.

    Within a block, layers whose calibration Gram is the same tensor read the same input
    (calibration.py aliases them): they form a family (e.g. query/key/value). The family's
    members in blocks b, b+1, ... b+share_blocks-1 share one dictionary.
    """
    if share == "none":
        return [Group(n, [n]) for n in targets]
    fam_of: dict[str, str] = {}
    by_block: dict[tuple[str, int], list[str]] = {}
    for n in targets:
        sb = split_block(n)
        if sb is None:
            fam_of[n] = n
            continue
        by_block.setdefault(sb[:2], []).append(n)
    for (prefix, _), names in by_block.items():
        for n in names:
            peers = [m for m in names if grams[m] is grams[n]]
            fam_of[n] = prefix + ":" + "+".join(split_block(m)[2] for m in peers)
    groups: dict[str, list[str]] = {}
    for n in targets:
        sb = split_block(n)
        in_f = model.get_submodule(n).in_features
        key = fam_of[n] if sb is None else f"{fam_of[n]}@{sb[1] // share_blocks}/in{in_f}"
        groups.setdefault(key, []).append(n)
    return [Group(k, v) for k, v in groups.items()]


@register
class CoSpaDiMethod(Method):
    name = "cospadi"
    default_calib_mode = "sequential"  # measured better (issue 21): SmolLM2 0.2: worst domain 5.58x -> 4.36x; MiniLM 0.5: equal
    summary = "sparse dictionary W ~ S D fitted on calibration activations (CoSpaDi), never worse than whitened SVD"
    needs_calibration = True
    options = (
        MethodOption("atoms", int, None, "dictionary size k (default: chosen per layer within the byte budget)", min=1,
                     limit=WIDEST),
        MethodOption("sparsity", int, None, "atoms per output neuron s (default: chosen per layer within the budget)",
                     min=1, limit=WIDEST),
        MethodOption("share", str, "none",
                     "one dictionary per layer, or per group of same-input projections across blocks",
                     choices=("none", "group")),
        MethodOption("share-blocks", int, 2, "consecutive blocks per shared dictionary (with --share group)", min=1,
                     limit=BLOCKS),
        MethodOption("dict-iters", int, 10, "dictionary-learning iterations per layer (time vs error)", min=1,
                     max=10_000),
    )

    def sequential_unit(self, options: dict) -> int:
        """--share group: the blocks sharing one dictionary are compressed (and reconstructed) together."""
        return int(options.get("share_blocks") or 2) if options.get("share") == "group" else 1

    def check_options(self, options: dict) -> None:
        atoms, sparsity = options.get("atoms"), options.get("sparsity")
        if atoms is not None and sparsity is not None and sparsity > atoms:
            raise UserError(f"--sparsity {sparsity} exceeds --atoms {atoms}", "choose s <= k")

    def compress(self, model: nn.Module, targets: list[str], ctx: CompressContext) -> CompressResult:
        atoms, sparsity = ctx.opt("atoms"), ctx.opt("sparsity")
        if atoms is not None and atoms < 1 or sparsity is not None and sparsity < 1:
            raise UserError("--atoms and --sparsity must be positive", "pass e.g. --atoms 128 --sparsity 32")
        if atoms is not None and sparsity is not None and sparsity > atoms:
            raise UserError(f"--sparsity {sparsity} exceeds --atoms {atoms}", "choose s <= k")
        share, share_blocks = ctx.opt("share", "none"), int(ctx.opt("share_blocks", 2))
        if share_blocks < 1:
            raise UserError("--share-blocks must be >= 1", "pass e.g. --share-blocks 2")
        # Statistics of the ORIGINAL model: collected before any layer is replaced.
        grams = ctx.require_calibration().grams(model, targets)
        groups = make_groups(model, targets, grams, share, share_blocks)
        records, counts = [], {"cospadi": 0, "svd-fallback": 0, "dense": 0}
        torch.manual_seed(ctx.seed)
        for g in track(groups, f"cospadi ({'shared' if share == 'group' else 'per-layer'}) dictionaries"):
            with single_thread():
                recs = self.fit_group(model, g, grams, ctx, atoms, sparsity)
            for r in recs:
                counts[r.metrics.get("chosen", "dense")] += 1
            records.extend(recs)
        notes = [f"cospadi share={share}" + (f" (blocks per group {share_blocks})" if share == "group" else "") +
                 f": {counts['cospadi']} sparse-dictionary layers, {counts['svd-fallback']} kept whitened SVD "
                 f"(lower calibration error at the same bytes), {counts['dense']} dense",
                 "bytes count D, code values and code indices at their stored width; a shared D is charged once"]
        return CompressResult(records, notes=notes, extra={"groups": len(groups)})

    def fit_group(self, model: nn.Module, g: Group, grams: dict[str, torch.Tensor], ctx: CompressContext,
                  atoms: int | None, sparsity: int | None) -> list:
        layers = [model.get_submodule(n) for n in g.names]
        Ws = [l.weight.detach().to(ctx.device) for l in layers]
        Gs = [grams[n].to(ctx.device) for n in g.names]
        elem = layers[0].weight.element_size()
        in_f = layers[0].in_features
        outs = [l.out_features for l in layers]
        budget = sum(int((1.0 - ctx.ratio) * o * in_f * elem) for o in outs)
        cands = candidate_pairs(in_f, outs, budget, elem, atoms, sparsity)
        cands = [(k, s) for k, s in cands if 1 <= s <= k <= min(in_f, sum(outs))]
        fit: DictFit | None = None
        if cands:
            fit = fit_dictionary(Ws, Gs, cands, iters=int(ctx.opt("dict_iters", 10)))
        # The reference: whitened SVD per layer with the same bytes (the budget, or with a user
        # (k, s) the bytes it actually uses). Its error comes from the whitened spectrum.
        if fit is not None and (atoms is not None or sparsity is not None):
            used = fit.k * in_f * elem + fit.s * sum(outs) * (elem + index_bytes(fit.k))
            ranks = [min(int(used * o / sum(outs)) // ((o + in_f) * elem), min(o, in_f)) for o in outs]
        else:
            ranks = [uniform_rank(o, in_f, ctx.ratio) for o in outs]
        spectra = [whitened_sq_spectrum(W, G) for W, G in zip(Ws, Gs)]
        svd_err = [float(sp[r:].sum()) ** 0.5 if r > 0 else float("inf") for sp, r in zip(spectra, ranks)]
        use_dict = fit is not None and fit.total_sq_error <= sum(e * e for e in svd_err)
        records = []
        if use_dict:
            D = nn.Parameter(fit.D.to(layers[0].weight.dtype).contiguous())
            for n, l, i, v, e, es in zip(g.names, layers, fit.idx, fit.val, fit.errors, svd_err):
                new = SparseDictLinear(D, i, v.to(l.weight.dtype), l.bias, shared=len(layers),
                                       group=g.key if len(layers) > 1 else None).to(l.weight.device)
                records.append(replace_layer(model, n, new, self._metrics("cospadi", e, es, fit)))
            return records
        for j, (n, l, W, G, e_svd, r) in enumerate(zip(g.names, layers, Ws, Gs, svd_err, ranks)):
            if r <= 0:
                records.append(replace_layer(model, n, None, {"chosen": "dense"}))
                continue
            f = whitened_svd(W, gram_factor(G), r)
            new = LowRankLinear(f.A.to(l.weight.dtype), f.B.to(l.weight.dtype), l.bias).to(l.weight.device)
            m = {"chosen": "svd-fallback", "calib_output_error": e_svd, "svd_output_error": e_svd}
            if fit is not None:
                m["cospadi_output_error"] = fit.errors[j]
            records.append(replace_layer(model, n, new, m))
        return records

    @staticmethod
    def _codes(idx: torch.Tensor, val: torch.Tensor, k: int) -> torch.Tensor:
        return torch.zeros(idx.shape[1], k, dtype=val.dtype, device=val.device).scatter_(1, idx.T, val.T)

    @staticmethod
    def _metrics(chosen: str, err: float, svd_err: float, fit: DictFit) -> dict:
        return {"chosen": chosen, "calib_output_error": err, "svd_output_error": svd_err,
                "error_vs_svd": round(err / svd_err, 4) if svd_err > 0 else None, "atoms": fit.k, "sparsity": fit.s}


@contextlib.contextmanager
def single_thread():
    """torch.linalg (eigh, cholesky) with 2 OpenMP threads on a shared 2-core machine ran
    10-100x slower than with one (threads spin while other processes hold the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
