"""Matrix kernels behind the atoms' norms and dual maps.

Everything here works on 2-D float tensors and runs in float32 (or float64 when given
float64): callers up-cast bf16/fp16 so rounding does not decide a norm or a direction.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024): they push every singular
# value above ~1e-3 of the largest into [0.7, 1.2] in five steps.
_QUINTIC = (3.4445, -4.7750, 2.0315)


# Below this many rows or columns the spectral norm is computed exactly.
_EXACT_BELOW = 16


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def spectral_norm(
    w: Tensor, v0: Tensor | None = None, tol: float = 1e-5, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Largest singular value ``σ₁(w)`` by Golub–Kahan–Lanczos, and its right singular vector.

    Lanczos converges in tens of steps on the clustered top spectra of random matrices, where
    plain power iteration needs hundreds. ``v0`` warm-starts it (pass the vector returned by the
    previous call): on slowly changing matrices such as an optimizer's updates it then stops
    after a few steps. Stops when the estimate changes by less than ``tol`` (relative).
    """
    dtype = _compute_dtype(w)
    a = w.to(dtype)
    m, n = a.shape
    if min(m, n) <= _EXACT_BELOW:  # small: an exact SVD is cheaper than the iteration
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s[0], vh[0]
    if v0 is None or v0.shape != (n,) or not bool(torch.isfinite(v0).all()) or v0.norm() == 0:
        gen = torch.Generator(device="cpu").manual_seed(n * 7919 + m)
        v0 = torch.randn(n, generator=gen, dtype=dtype)
    k_max = min(max_iter, m, n)
    # Lanczos vectors, kept for full reorthogonalization (two matvecs per step, no loops).
    us = torch.zeros(k_max, m, dtype=dtype, device=a.device)
    vs = torch.zeros(k_max + 1, n, dtype=dtype, device=a.device)
    v = v0.to(device=a.device, dtype=dtype)
    vs[0] = v / v.norm()
    alphas: list[float] = []
    betas: list[float] = []
    est, k = 0.0, 0
    for k in range(k_max):
        u = a @ vs[k]
        if k > 0:
            u -= betas[-1] * us[k - 1]
            u -= us[:k].T @ (us[:k] @ u)
        alpha = float(u.norm())
        if alpha <= torch.finfo(dtype).tiny:
            break
        us[k] = u / alpha
        alphas.append(alpha)
        r = a.T @ us[k] - alpha * vs[k]
        r -= vs[: k + 1].T @ (vs[: k + 1] @ r)
        beta = float(r.norm())
        new_est = _top_singular(alphas, betas)[0]
        done = abs(new_est - est) <= tol * new_est or beta <= tol * new_est
        est = new_est
        if done:
            break
        betas.append(beta)
        vs[k + 1] = r / beta
    if not alphas:
        return torch.zeros((), dtype=dtype, device=a.device), vs[0]
    sigma, right = _top_singular(alphas, betas)
    # The Ritz vector lifted back: the next call's warm start.
    j = len(alphas)
    v_top = torch.as_tensor(right, dtype=dtype, device=a.device) @ vs[:j]
    return torch.tensor(sigma, dtype=dtype, device=a.device), v_top / v_top.norm()


def _top_singular(alphas: list[float], betas: list[float]) -> tuple[float, np.ndarray]:
    """Top singular value and right singular vector of the upper-bidiagonal matrix with
    diagonal ``alphas`` and superdiagonal ``betas`` (a few numbers: numpy, no device work)."""
    k = len(alphas)
    b = np.diag(np.asarray(alphas, dtype=np.float64))
    if k > 1:
        b += np.diag(np.asarray(betas[: k - 1], dtype=np.float64), 1)
    _, s, vh = np.linalg.svd(b)
    return float(s[0]), vh[0]


@torch.no_grad()
def orthogonalize(
    g: Tensor, method: str = "newton_schulz", steps: int = 5, polish: int = 4, rtol: float = 1e-3
) -> Tensor:
    """The polar factor ``U Vᵀ`` of ``g = U Σ Vᵀ`` (batched over leading dims): the dual map
    of the spectral norm.

    ``newton_schulz`` (default, matmuls only): ``steps`` quintic steps with Muon's coefficients
    bring singular values above about ``1e-3·σ₁`` into [0.7, 1.2]; ``polish`` cubic steps
    ``x ↦ 1.5x − 0.5x³`` then pull them to 1 to ~1e-4, so the result has spectral norm 1 and
    ``⟨g, UVᵀ⟩`` is the nuclear norm. Singular values far below ``σ₁`` (rounding noise) stay
    small instead of becoming full-size directions: the iteration is a soft threshold.
    ``svd`` is exact and treats singular values below ``rtol·σ₁`` as zero, for the same reason.
    A zero matrix maps to zero.
    """
    if method not in ("newton_schulz", "svd"):
        raise ValueError(
            f"unknown orthogonalization method {method!r}: use 'newton_schulz' or 'svd'"
        )
    dtype = _compute_dtype(g)
    x = g.to(dtype)
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:  # work on the wide side: X Xᵀ is the smaller Gram matrix
        x = x.mT
    if method == "svd":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        top = s[..., :1]
        keep = ((s > rtol * top) & (top > 0)).to(dtype)
        out = (u * keep.unsqueeze(-2)) @ vh
    else:
        # Frobenius ≥ spectral: every singular value starts in [0, 1]; zero stays zero.
        scale = x.norm(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        x = x / scale
        a, b, c = _QUINTIC
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        # The quintic overshoots up to ~1.2; the cubic step's fixed point at 1 is stable only
        # below √3 and it maps (1, √3) back under 1, so polishing converges from there.
        for _ in range(polish):
            x = 1.5 * x - 0.5 * (x @ x.mT) @ x
        out = x
    if transpose:
        out = out.mT
    return out.to(g.dtype)
