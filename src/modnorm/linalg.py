"""Matrix kernels behind the atoms' norms and dual maps.

Everything here works on 2-D float tensors and runs in float32 (or float64 when given
float64): callers up-cast bf16/fp16 so rounding does not decide a norm or a direction.
"""

from __future__ import annotations

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
    after two or three steps. Stops when the estimate changes by less than ``tol`` (relative).
    """
    dtype = _compute_dtype(w)
    a = w.to(dtype)
    m, n = a.shape
    if min(m, n) <= _EXACT_BELOW:  # small: an exact SVD is cheaper than the iteration
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s[0], vh[0]
    if v0 is None or v0.shape != (n,) or not torch.isfinite(v0).all() or v0.norm() == 0:
        gen = torch.Generator(device="cpu").manual_seed(n * 7919 + m)
        v0 = torch.randn(n, generator=gen, dtype=dtype).to(a.device)
    v = v0.to(device=a.device, dtype=dtype)
    v = v / v.norm()
    k_max = min(max_iter, m, n)
    vs: list[Tensor] = [v]
    us: list[Tensor] = []
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    est = torch.zeros((), dtype=dtype, device=a.device)
    u_prev, beta = None, None
    for _ in range(k_max):
        u = a @ vs[-1]
        if u_prev is not None:
            u = u - beta * u_prev
        for q in us:  # full reorthogonalization: k is small, and it keeps Lanczos honest
            u = u - (q @ u) * q
        alpha = u.norm()
        if alpha <= torch.finfo(dtype).tiny:
            break
        u = u / alpha
        us.append(u)
        alphas.append(alpha)
        v_next = a.T @ u - alpha * vs[-1]
        for q in vs:
            v_next = v_next - (q @ v_next) * q
        beta = v_next.norm()
        # Ritz value: the top singular value of the k x k upper-bidiagonal matrix built so far.
        b = torch.diag(torch.stack(alphas))
        if len(betas) > 0:
            b = b + torch.diag(torch.stack(betas), 1)
        new_est = torch.linalg.svdvals(b)[0]
        done = (new_est - est).abs() <= tol * new_est
        est = new_est
        if done or beta <= tol * est:
            break
        betas.append(beta)
        vs.append(v_next / beta)
        u_prev = u
    if est == 0:
        return est, v
    # Right singular vector of the Ritz value, lifted back: the next call's warm start.
    b = torch.diag(torch.stack(alphas))
    if len(alphas) > 1:
        b = b + torch.diag(torch.stack(betas[: len(alphas) - 1]), 1)
    _, _, vh = torch.linalg.svd(b)
    v_top = torch.stack(vs[: len(alphas)], dim=1) @ vh[0]
    return est, v_top / v_top.norm()


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
