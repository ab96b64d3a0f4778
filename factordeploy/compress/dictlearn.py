"""Sparse dictionary learning under the calibration metric (the math behind `cospadi`).

Problem (one layer, or a group of layers sharing one dictionary): find D (k x in) and, per
layer l, codes S_l (out_l x k) with exactly s nonzeros per row, minimising

    sum_l ||X_l W_l^T - X_l (S_l D)^T||_F^2 = sum_l ||(W_l - S_l D) L_l||_F^2,   L_l L_l^T = G_l = X_l^T X_l.

Whitening: with Y = L^T W^T (in x out, one signal per output neuron) and the whitened
dictionary Dw = L^T D^T (in x k), this is standard dictionary learning ||Y - Dw S^T||_F with
s-sparse columns of S^T. The sparse factor sits on the output side, so whitening by the
input Gram is exact (the orientation of the paper, y = x W_p with W_p = W^T).

Solver (budgeted for a 2-core CPU; every step vectorised over all signals in torch):
1. Initialise from the whitened SVD: Dw = the top-k left singular vectors of Y. With k = s
   this IS the whitened truncated SVD.
2. Orthonormal alternation: for an orthonormal Dw the best s-sparse code of each signal is
   exactly its s largest projections (top-s of |Dw^T y|, a batched OMP that needs no
   least squares), and the best orthonormal Dw for fixed codes is the orthogonal Procrustes
   solution (SVD of Y C^T). Both steps are exact, so the error never increases.
3. Polish without the orthonormality constraint (K-SVD-like): batched least-squares refit
   of every signal's s values on its support, then the optimal dictionary for those codes
   (method of optimal directions; for a group with different Grams, conjugate gradients on
   the exact objective). Each step is optimal for its block, so the error is monotone.
The best iterate (exact error, float64) is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layers import index_dtype
from .linalg import gram_factor


@dataclass
class DictFit:
    """A fitted dictionary (un-whitened) and one code set per layer of the group."""

    D: torch.Tensor  # k x in
    idx: list[torch.Tensor]  # per layer: s x out_l (long)
    val: list[torch.Tensor]  # per layer: s x out_l
    errors: list[float]  # per layer: ||X (W - S D)^T||_F under the (damped) calibration Gram
    iterations: int
    k: int
    s: int

    @property
    def total_sq_error(self) -> float:
        return sum(e * e for e in self.errors)


def top_s_codes(A: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of A (k x N): indices (s x N) and values of its s largest-magnitude entries."""
    idx = A.T.abs().topk(s, dim=1, sorted=False).indices.T  # topk along a contiguous dim is ~3x faster
    return idx, A.gather(0, idx)


def scatter_codes(idx: torch.Tensor, val: torch.Tensor, k: int) -> torch.Tensor:
    """Dense (k x N) code matrix from (s x N) indices/values."""
    return torch.zeros(k, idx.shape[1], dtype=val.dtype, device=val.device).scatter_(0, idx, val)


def procrustes(M: torch.Tensor) -> torch.Tensor:
    """argmax_{Q^T Q = I} tr(Q^T M): the polar factor U V^T of M = M (M^T M)^-1/2.

    Through eigh of the k x k Gram in float64: torch's CPU SVD of these tall matrices is
    10-50x slower than eigh on this machine.
    """
    M64 = M.to(torch.float64)
    e, V = torch.linalg.eigh(M64.T @ M64)
    e = e.clamp_min(float(e.max()) * 1e-14)
    return (M64 @ (V * e.rsqrt()) @ V.T).to(M.dtype)


def principal_subspace(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and squared singular values of Y (in x N), descending.

    eigh of Y Y^T (in x in, float64) instead of an SVD of the wide Y (same reason as above).
    """
    Y64 = Y.to(torch.float64)
    if Y.shape[0] <= Y.shape[1]:
        e, V = torch.linalg.eigh(Y64 @ Y64.T)
        return V.flip(1), e.flip(0).clamp_min(0)
    e, V = torch.linalg.eigh(Y64.T @ Y64)  # fewer signals than dimensions: go through Y^T Y
    e, V = e.flip(0).clamp_min(0), V.flip(1)
    return (Y64 @ V) * e.clamp_min(float(e.max()) * 1e-14).rsqrt(), e


def orthonormal_dictionary(Y: torch.Tensor, k: int, s: int, iters: int,
                           Dw: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Alternate exact top-s coding and Procrustes updates; returns (best Dw, its squared error)."""
    if Dw is None:
        Dw = principal_subspace(Y)[0][:, :k].to(Y.dtype).contiguous()
    total = float((Y * Y).sum())
    best, best_err = Dw, float("inf")
    for it in range(iters + 1):
        idx, val = top_s_codes(Dw.T @ Y, s)
        err = total - float((val * val).sum())
        if err < best_err:
            best, best_err = Dw, err
        if it == iters:
            break
        Dw = procrustes(Y @ scatter_codes(idx, val, k).T)
    return best, best_err


def refit_values(H: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, val0: torch.Tensor | None = None,
                 iters: int = 6) -> torch.Tensor:
    """Least-squares values on fixed supports: per column n solve H[S_n,S_n] c = B[S_n, n].

    H (k x k) is the whitened dictionary's Gram, B (k x N) its correlations with the signals.
    Batched conjugate gradients on all columns at once with masked dense GEMMs: O(iters k^2 N)
    instead of N Cholesky factorisations of s x s (O(N s^3), minutes for SmolLM2's s ~ 200),
    warm-started from `val0` (the orthonormal stage's values are already close).
    """
    k, N = B.shape
    mask = torch.zeros(k, N, dtype=torch.bool, device=B.device).scatter_(0, idx, True)
    x = scatter_codes(idx, val0.to(B.dtype), k) if val0 is not None else torch.zeros_like(B)
    r = torch.where(mask, B - H @ x, 0.0)
    p = r.clone()
    rs = (r * r).sum(0)
    tol = 1e-24 * (B * B).sum(0).clamp_min(1e-300)
    for _ in range(iters):
        Ap = torch.where(mask, H @ p, 0.0)
        alpha = rs / (p * Ap).sum(0).clamp_min(1e-300)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum(0)
        if bool((rs_new <= tol).all()):
            break
        p = r + (rs_new / rs.clamp_min(1e-300)) * p
        rs = rs_new
    return x.gather(0, idx)


def index_bytes(k: int) -> int:
    """Bytes per stored code index for a k-atom dictionary (layers.index_dtype)."""
    return torch.empty((), dtype=index_dtype(k)).element_size()


def candidate_pairs(in_f: int, outs: list[int], budget: int, elem: int,
                    atoms: int | None = None, sparsity: int | None = None,
                    factors: tuple[float, ...] = (1.1, 1.25, 1.5)) -> list[tuple[int, int]]:
    """(k, s) pairs whose bytes (D + values + indices at their real width) fit `budget`.

    Without user choices, k spans factors of the SVD rank of equal bytes (the best k/r was
    1.1-1.6 on MiniLM/SmolLM2 layers) plus k = 256, the largest k with one-byte indices;
    s is the largest sparsity the remaining bytes allow. k <= min(in, signals) keeps the
    orthonormal stage well defined.
    """
    N = sum(outs)
    kmax = min(in_f, N)

    def s_for(k: int) -> int:
        return int((budget - k * in_f * elem) // (N * (elem + index_bytes(k))))

    if atoms is not None and sparsity is not None:
        return [(atoms, sparsity)]
    if atoms is not None:
        return [(atoms, min(s_for(atoms), atoms))]
    if sparsity is not None:
        k = int((budget - sparsity * N * elem) // (in_f * elem))
        while k > sparsity and s_for(k) < sparsity:  # int16 indices past 256 atoms cost more
            k -= 1
        return [(k, sparsity)]
    r = budget / ((in_f + N) * elem)
    ks = sorted({max(2, round(r * f)) for f in factors} | ({256} if 1.05 * r <= 256 <= 1.5 * r else set()))
    out = []
    for k in ks:
        k = min(k, kmax)
        s = s_for(k)
        if 1 <= s < k and (k, s) not in out:
            out.append((k, s))
    return out


def fit_dictionary(Ws: list[torch.Tensor], Gs: list[torch.Tensor], candidates: list[tuple[int, int]],
                   iters: int = 10, screen: int = 3, polish: int = 1, damp: float = 1e-6,
                   dtype: torch.dtype = torch.float32) -> DictFit:
    """Fit one dictionary (k atoms, s per output neuron) to the layers Ws with input Grams Gs.

    Every (k, s) candidate gets `screen` orthonormal iterations from its SVD start; the best
    continues to `iters`, then `polish` rounds of exact value refits and dictionary updates.
    All layers must share `in`. Layers with the same Gram (q/k/v reading one input) are
    whitened exactly together; for different Grams the orthonormal stage uses their sum as
    a common metric and the polish stage optimises the exact objective. Errors are in the
    damped metric L L^T = G + lambda I that whitened SVD (linalg.gram_factor) also uses.
    """
    Ws = [W.detach().to(torch.float64) for W in Ws]
    Gs = [G.to(torch.float64) for G in Gs]
    same = all(G is Gs[0] for G in Gs) or all(torch.equal(G, Gs[0]) for G in Gs)
    L = gram_factor(Gs[0] if same else sum(Gs), damp)
    Ls = [L] * len(Ws) if same else [gram_factor(G, damp) for G in Gs]
    Yl = [Lx.T @ W.T for Lx, W in zip(Ls, Ws)]  # per layer, exact whitening (in x out_l)
    Y = torch.cat(Yl if same else [L.T @ W.T for W in Ws], dim=1)  # in x N, common metric
    Yf = Y.to(dtype)
    U = principal_subspace(Y)[0].to(dtype)
    scored = []
    for k, s in candidates:
        Dw, err = orthonormal_dictionary(Yf, k, s, screen, U[:, :k].contiguous())
        scored.append((err, k, s, Dw))
    _, k, s, Dw = min(scored, key=lambda t: t[0])
    Dw, _ = orthonormal_dictionary(Yf, k, s, max(iters - screen, 0), Dw)
    Dw = Dw.to(torch.float64)
    D = torch.linalg.solve_triangular(L.T, Dw, upper=True).T  # k x in (un-whitened: Dw = L^T D^T)
    outs = [W.shape[0] for W in Ws]
    ynorm = [float((y * y).sum()) for y in Yl]

    def refit(D: torch.Tensor, idxs: list, vals: list) -> tuple[list, list[float]]:
        """Exact per-layer values on fixed supports, and the resulting squared errors."""
        new_vals, errs = [], []
        for Lx, y, yn, idx, v0 in zip(Ls, Yl, ynorm, idxs, vals):
            Dwl = Lx.T @ D.T  # whitened dictionary of this layer (in x k)
            H, B = Dwl.T @ Dwl, Dwl.T @ y
            v = refit_values(H, B, idx, v0)
            C = scatter_codes(idx, v, k)
            errs.append(max(yn - 2 * float((C * B).sum()) + float((C * (H @ C)).sum()), 0.0))
            new_vals.append(v)
        return new_vals, errs

    # Supports from the orthonormal stage (exact top-s when the metric is shared).
    idx_all, val_all = top_s_codes(Dw.T @ Y, s)
    idxs = list(torch.split(idx_all, outs, dim=1))
    vals, errs = refit(D, idxs, list(torch.split(val_all, outs, dim=1)))
    best = (D, vals, errs)
    for _ in range(polish):
        Ss = [scatter_codes(i, v, k).T for i, v in zip(idxs, vals)]  # out_l x k
        D = dictionary_update(Ws, [Lx @ Lx.T for Lx in Ls], Ss, D, same)
        vals, errs = refit(D, idxs, vals)
        if sum(errs) < sum(best[2]):
            best = (D, vals, errs)
    D, vals, errs = best
    return DictFit(D, [i.contiguous() for i in idxs], vals, [e ** 0.5 for e in errs], iters + polish, k, s)


def whitened_sq_spectrum(W: torch.Tensor, G: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Squared singular values of W L (descending), L = linalg.gram_factor(G).

    The whitened SVD of rank r has squared output error sum(spectrum[r:]) (linalg.whitened_svd),
    so the SVD reference at any byte budget costs one small eigh, not an SVD.
    """
    L = gram_factor(G, damp)
    WL = W.detach().to(torch.float64) @ L
    M = WL @ WL.T if WL.shape[0] <= WL.shape[1] else WL.T @ WL
    return torch.linalg.eigvalsh(M).flip(0).clamp_min(0)


def dictionary_update(Ws: list[torch.Tensor], Gs: list[torch.Tensor], Ss: list[torch.Tensor],
                      D0: torch.Tensor, same: bool, cg_iters: int = 30) -> torch.Tensor:
    """argmin_D sum_l ||(W_l - S_l D) L_l||^2: sum_l P_l D G_l = sum_l S_l^T W_l G_l, P_l = S_l^T S_l.

    One shared Gram: G cancels (D = P^-1 sum S_l^T W_l, the MOD update). Otherwise CG on the
    SPD operator D -> sum_l P_l D G_l, warm-started from D0.
    """
    Ps = [S.T @ S for S in Ss]
    k = D0.shape[0]
    eye = torch.eye(k, dtype=D0.dtype, device=D0.device)
    if same:
        P = sum(Ps)
        R = sum(S.T @ W for S, W in zip(Ss, Ws))
        return torch.linalg.solve(P + 1e-10 * P.diagonal().mean() * eye, R)
    b = sum(S.T @ W @ G for S, W, G in zip(Ss, Ws, Gs))

    def op(D: torch.Tensor) -> torch.Tensor:
        return sum(P @ D @ G for P, G in zip(Ps, Gs))

    D = D0.clone()
    r = b - op(D)
    p = r.clone()
    rs = float((r * r).sum())
    b_norm = float((b * b).sum()) or 1.0
    for _ in range(cg_iters):
        Ap = op(p)
        alpha = rs / max(float((p * Ap).sum()), 1e-300)
        D = D + alpha * p
        r = r - alpha * Ap
        rs_new = float((r * r).sum())
        if rs_new < 1e-20 * b_norm:
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return D
