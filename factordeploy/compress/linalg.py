"""Shared linear algebra for every method: truncated SVD, Gram whitening, weighted SVD.

All data-aware methods reduce to "SVD (or dictionary learning) of a transformed weight";
the transforms live here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Factors:
    """W ~ B @ A, with the singular values that were kept and dropped (of the transformed matrix)."""

    A: torch.Tensor  # r x in
    B: torch.Tensor  # out x r
    kept: torch.Tensor
    dropped: torch.Tensor


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float64 for accuracy; returns U, S, Vh."""
    return torch.linalg.svd(W.detach().to(torch.float64), full_matrices=False)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values only, float64 (cheaper than a full SVD; used for rank allocation)."""
    return torch.linalg.svdvals(W.detach().to(torch.float64))


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int,
                  balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate to `rank`; returns (A, B) with B @ A = U_r S_r Vh_r.

    balanced=False puts S on the left (B = U S, A = Vh), as in the plain SVD recipe;
    balanced=True splits sqrt(S) to both sides (WeLore's U sqrt(S), sqrt(S) V^T).
    """
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    if balanced:
        s = S.sqrt()
        return s[:, None] * Vh, U * s[None, :]
    return Vh, U * S[None, :]


def truncated_svd(W: torch.Tensor, rank: int, balanced: bool = False) -> Factors:
    """Best rank-`rank` approximation of W in Frobenius norm (Eckart-Young)."""
    U, S, Vh = svd(W)
    A, B = split_factors(U, S, Vh, rank, balanced)
    return Factors(A.to(W.dtype), B.to(W.dtype), S[:rank], S[rank:])


def gram_factor(G: torch.Tensor, damp: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor L of the damped Gram matrix G = X^T X (L L^T = G + lambda I).

    Damping grows until Cholesky succeeds: calibration Grams of real layers are often
    singular (dead channels), and whitening must still be defined there.
    """
    G = G.to(torch.float64)
    n = G.shape[0]
    scale = float(torch.diagonal(G).mean().clamp_min(1e-12))
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    lam = damp
    for _ in range(12):
        L, info = torch.linalg.cholesky_ex(G + lam * scale * eye)
        if int(info) == 0:
            return L
        lam *= 10
    raise RuntimeError("Gram matrix could not be made positive definite")


def whitened_svd(W: torch.Tensor, L: torch.Tensor, rank: int) -> Factors:
    """Minimise ||X W^T - X (B A)^T||_F given L L^T = X^T X.

    ||X M^T||_F = ||M L||_F, so the optimum is the truncated SVD of W L with the right
    factor multiplied by L^-1. The output error equals the dropped singular values of W L.
    """
    WL = W.detach().to(torch.float64) @ L
    U, S, Vh = svd(WL)
    A_w, B = split_factors(U, S, Vh, rank)
    # A = A_w L^-1  <=>  A L = A_w  <=>  L^T A^T = A_w^T
    A = torch.linalg.solve_triangular(L.T, A_w.T, upper=True).T
    return Factors(A.to(W.dtype), B.to(W.dtype), S[:rank], S[rank:])


def row_weighted_svd(W: torch.Tensor, row_weight: torch.Tensor, rank: int) -> Factors:
    """Minimise sum_i w_i ||W_i - (BA)_i||^2: SVD of diag(sqrt w) W, then divide the rows back.

    With equal weights this is exactly truncated SVD (FWSVD's reduction, tested).
    """
    d = row_weight.detach().to(torch.float64).sqrt()
    U, S, Vh = svd(d[:, None] * W.detach().to(torch.float64))
    A, B = split_factors(U, S, Vh, rank)
    B = B / d[:, None]
    return Factors(A.to(W.dtype), B.to(W.dtype), S[:rank], S[rank:])


def output_error(W: torch.Tensor, W_hat: torch.Tensor, G: torch.Tensor) -> float:
    """||X (W - W_hat)^T||_F computed from the Gram matrix G = X^T X (no activations kept)."""
    E = (W.detach() - W_hat.detach()).to(torch.float64)
    val = torch.einsum("oi,ij,oj->", E, G.to(torch.float64), E)
    return float(val.clamp_min(0).sqrt())


def damped_gram(L: torch.Tensor) -> torch.Tensor:
    """G = L L^T: the (damped) Gram matrix whose Cholesky factor `gram_factor` returned.

    Least-squares fits that share a metric with `whitened_svd` use this G, so every step of an
    alternating fit decreases the same objective ||(W - W_hat) L||_F.
    """
    L = L.to(torch.float64)
    return L @ L.T


def support_lstsq(R: torch.Tensor, G: torch.Tensor, idx: torch.Tensor, chunk: int = 1024,
                  max_elems: int = 1 << 25, RG: torch.Tensor | None = None) -> torch.Tensor:
    """Values on a fixed sparse support minimising sum_o (r_o - s_o) G (r_o - s_o)^T.

    R (out x in) is the matrix to fit, G (in x in) the metric (X^T X: the output error
    ||X (R - S)^T||^2), idx the sorted flat row-major support. Per row o with support
    columns J: G[J, J] s_J = (G r_o)[J]. Rows are solved in padded batches of at most `chunk` rows
    and `max_elems` system entries (rows x kmax^2 float64: 256 MB), so a 7B-sized layer, or a
    support that piles up in a few rows, stays bounded. Returns the values in idx order.

    `RG` (out x in) replaces R @ G on the right-hand side: fitting X_s S^T to a target X_o R^T
    measured on OTHER inputs X_o (block-wise reconstruction: the compressed prefix's inputs X_s, the
    original's X_o) takes G = X_s^T X_s and RG = R (X_s^T X_o)^T.
    """
    R64, G64 = R.detach().to(torch.float64), G.to(torch.float64)
    RG64 = R64 @ G64 if RG is None else RG.detach().to(torch.float64)
    out_f, in_f = R64.shape
    idx = idx.long()
    rows, cols = idx // in_f, idx % in_f
    counts = torch.bincount(rows, minlength=out_f)
    starts = torch.cumsum(counts, 0) - counts
    kmax = int(counts.max()) if idx.numel() else 0
    vals = torch.zeros(idx.numel(), dtype=torch.float64, device=R.device)
    if kmax == 0:
        return vals.to(R.dtype)
    pos = torch.arange(idx.numel(), device=R.device) - starts[rows]  # slot of each entry inside its row
    chunk = max(1, min(chunk, max_elems // (kmax * kmax)))
    for r0 in range(0, out_f, chunk):
        r1 = min(out_f, r0 + chunk)
        sel = (rows >= r0) & (rows < r1)
        n = r1 - r0
        J = torch.zeros(n, kmax, dtype=torch.long, device=R.device)
        mask = torch.zeros(n, kmax, dtype=torch.bool, device=R.device)
        J[rows[sel] - r0, pos[sel]] = cols[sel]
        mask[rows[sel] - r0, pos[sel]] = True
        GJJ = G64[J[:, :, None], J[:, None, :]]  # n x kmax x kmax
        m2 = mask[:, :, None] & mask[:, None, :]
        eye = torch.eye(kmax, dtype=torch.float64, device=R.device).expand(n, kmax, kmax)
        GJJ = torch.where(m2, GJJ, eye * (~mask[:, :, None]))  # padded slots: identity rows, zero rhs
        rhs = torch.gather(RG64[r0:r1], 1, J) * mask
        sol = torch.linalg.solve(GJJ, rhs.unsqueeze(-1)).squeeze(-1)
        vals[sel] = sol[rows[sel] - r0, pos[sel]]
    return vals.to(R.dtype)


def channel_lstsq(R: torch.Tensor, G: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """W_s (out x |I|) minimising ||X R^T - X[:, I] W_s^T||_F: W_s = R G[:, I] G[I, I]^-1."""
    R64, G64 = R.detach().to(torch.float64), G.to(torch.float64)
    I = channels.long()
    rhs = R64 @ G64[:, I]  # out x c
    return torch.linalg.solve(G64[I][:, I], rhs.T).T.to(R.dtype)


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component so A's row and B's column have equal norms (B @ A unchanged).

    Whitened factors come out as A = V^T L^-1 (entries ~1e-3) and B = U S (entries ~10); a
    uniform-step optimiser like Adam would move A by a large relative amount per step.
    """
    with torch.no_grad():
        a, b = A.norm(dim=1), B.norm(dim=0)
        ok = (a > 0) & (b > 0)
        d = torch.where(ok, (b / torch.where(ok, a, torch.ones_like(a))).sqrt(), torch.ones_like(a))
        return A * d[:, None], B / d[None, :]


def refit_left(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, C: torch.Tensor | None = None) -> torch.Tensor:
    """B (out x r) minimising ||X_o W^T - X_s A^T B^T||_F for a fixed right factor A (r x in).

    G = X_s^T X_s (damp it first: `damped_gram(gram_factor(G))`), C = X_s^T X_o (None: X_o = X_s,
    C = G). Normal equations: (A G A^T) B^T = A C W^T (SVD-LLM's closed-form update of the kept
    factor, here toward the original layer's output on the original inputs).
    """
    W64, A64, G64 = W.detach().to(torch.float64), A.detach().to(torch.float64), G.to(torch.float64)
    C64 = G64 if C is None else C.to(torch.float64)
    M = A64 @ G64 @ A64.T
    rhs = A64 @ C64 @ W64.T
    return torch.linalg.solve(M, rhs).T.to(W.dtype)
