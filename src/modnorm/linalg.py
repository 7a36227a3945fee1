"""Matrix kernels behind the atoms' norms and dual maps.

Everything here works on 2-D float tensors and runs in float32 (or float64 when given
float64): callers up-cast bf16/fp16 so rounding does not decide a norm or a direction.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch
from torch import Tensor

# Muon's quintic Newton-Schulz coefficients (Jordan et al., 2024): they push every singular
# value above ~1e-3 of the largest into [0.7, 1.2] in five steps.
_QUINTIC = (3.4445, -4.7750, 2.0315)


# Lanczos steps before the stopping rule may fire: a Krylov space of this dimension already
# separates the top of a clustered spectrum from a warm start's stale direction.
_MIN_STEPS = 4

# After that, the stopping rule is checked every this many steps. On an accelerator each
# check waits for the device (a host synchronization) and an extra step only makes the
# estimate closer; on the CPU a check costs nothing and an extra step costs its products.
_CHECK_EVERY = {"cpu": 1, "accelerator": 2}

# Below this many rows or columns the spectral norm is computed exactly.
_EXACT_BELOW = 96


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def spectral_norm(
    w: Tensor, v0: Tensor | None = None, tol: float = 1e-5, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Largest singular value ``σ₁(w)`` of one matrix and its right singular vector; see
    `spectral_norms` (this is the batch of one)."""
    sigma, v = spectral_norms(w[None], None if v0 is None else v0[None], tol, max_iter)
    return sigma[0], v[0]


@torch.no_grad()
def spectral_norms(
    w: Tensor, v0: Tensor | None = None, tol: float = 1e-5, max_iter: int = 100
) -> tuple[Tensor, Tensor]:
    """Largest singular values ``σ₁`` of a batch of matrices ``(B, m, n)`` by Golub–Kahan–
    Lanczos, with their right singular vectors ``(B, n)``.

    Lanczos converges in tens of steps on the clustered top spectra of random matrices, where
    plain power iteration needs hundreds. ``v0`` warm-starts it (pass the vectors returned by
    the previous call): on slowly changing matrices such as an optimizer's updates it stops
    after a few steps. The whole batch moves in lockstep until every estimate changes by less
    than ``tol`` (relative) between checks of that rule: the first after ``_MIN_STEPS``
    steps, then every step on the CPU and every second step on an accelerator, where each
    check is a host synchronization.
    """
    dtype = _compute_dtype(w)
    a = w.to(dtype)
    batch, m, n = a.shape
    if min(m, n) <= _EXACT_BELOW:  # small: an exact SVD is cheaper than the iteration
        _, s, vh = torch.linalg.svd(a, full_matrices=False)
        return s[:, 0], vh[:, 0]
    gen = torch.Generator(device="cpu").manual_seed(n * 7919 + m)
    noise = torch.randn(batch, n, generator=gen, dtype=dtype).to(a.device)
    noise = noise / noise.norm(dim=1, keepdim=True)
    tiny = torch.finfo(dtype).tiny
    if v0 is None or v0.shape != (batch, n) or not bool(torch.isfinite(v0).all()):
        v = noise
    else:
        # A warm start alone can sit on a singular vector that is no longer the top one; its
        # Krylov space is then nearly invariant and the iteration stalls on the wrong value.
        # A fixed random component keeps every direction in play.
        v0 = v0.to(device=a.device, dtype=dtype)
        v = v0 / v0.norm(dim=1, keepdim=True).clamp_min(tiny) + 0.5 * noise
    norms = v.norm(dim=1, keepdim=True)
    k_max = min(max_iter, m, n)
    # Lanczos vectors, kept for full reorthogonalization (batched matvecs, no Python loops).
    us = torch.zeros(batch, k_max, m, dtype=dtype, device=a.device)
    vs = torch.zeros(batch, k_max + 1, n, dtype=dtype, device=a.device)
    vs[:, 0] = v / norms
    alphas: list[np.ndarray] = []  # the bidiagonal's entries, on the host
    betas: list[np.ndarray] = []
    pending: list[Tensor] = []  # (α, β) of the steps since the last check, on the device
    beta_t = torch.zeros(batch, dtype=dtype, device=a.device)
    est = np.zeros(batch)
    first = min(_MIN_STEPS, k_max)
    every = _CHECK_EVERY["cpu" if a.device.type == "cpu" else "accelerator"]
    for k in range(k_max):
        u = torch.einsum("bmn,bn->bm", a, vs[:, k])
        if k > 0:
            u -= beta_t[:, None] * us[:, k - 1]
            u -= torch.einsum("bkm,bk->bm", us[:, :k], torch.einsum("bkm,bm->bk", us[:, :k], u))
        alpha_t = u.norm(dim=1)
        us[:, k] = u / alpha_t.clamp_min(tiny)[:, None]
        r = torch.einsum("bmn,bm->bn", a, us[:, k]) - alpha_t[:, None] * vs[:, k]
        basis = vs[:, : k + 1]
        r -= torch.einsum("bkn,bk->bn", basis, torch.einsum("bkn,bn->bk", basis, r))
        beta_t = r.norm(dim=1)
        pending.append(torch.stack([alpha_t, beta_t]))
        steps = k + 1
        if steps == k_max or (steps >= first and (steps - first) % every == 0):
            pairs = torch.stack(pending).cpu().double().numpy()  # the check's one sync
            pending.clear()
            for alpha, beta in pairs:
                alphas.append(alpha)
                betas.append(beta)
            if steps == first and steps > 1:  # the first check compares with the step before
                est = _top_singular(alphas[:-1], betas)[0]
            new_est = _top_singular(alphas, betas)[0]
            done = (np.abs(new_est - est) <= tol * new_est) | (betas[-1] <= tol * new_est)
            est = new_est
            if done.all():
                break
        vs[:, k + 1] = r / beta_t.clamp_min(tiny)[:, None]
    sigma, right = _top_singular(alphas, betas)
    # The Ritz vectors lifted back: the next call's warm starts.
    j = len(alphas)
    coef = torch.as_tensor(right, dtype=dtype, device=a.device)
    v_top = torch.einsum("bj,bjn->bn", coef, vs[:, :j])
    v_top = v_top / v_top.norm(dim=1, keepdim=True).clamp_min(tiny)
    return torch.as_tensor(sigma, dtype=dtype, device=a.device), v_top


def _top_singular(
    alphas: list[np.ndarray], betas: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Top singular values ``(B,)`` and right singular vectors ``(B, k)`` of the batch of
    upper-bidiagonal matrices with diagonals ``alphas`` and superdiagonals ``betas``
    (a few numbers each: numpy on the host)."""
    k = len(alphas)
    diag = np.stack(alphas, axis=1)  # (B, k)
    b = np.zeros((diag.shape[0], k, k))
    idx = np.arange(k)
    b[:, idx, idx] = diag
    if k > 1:
        b[:, idx[:-1], idx[1:]] = np.stack(betas[: k - 1], axis=1)
    _, s, vh = np.linalg.svd(b)
    return s[:, 0], vh[:, 0]


PRECISIONS = ("full", "mixed")


@functools.cache
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: CUDA with bfloat16 support,
    or a CPU with AMX tiles that oneDNN may use. Elsewhere bfloat16 matmuls are emulated:
    1.5× to 200× slower than float32 on this machine's CPU held to older instruction sets
    (`ONEDNN_MAX_CPU_ISA`; docs/notes.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        return (isa == "ALL" or "AMX" in isa) and bool(amx())
    return False


@torch.no_grad()
def orthogonalize(
    g: Tensor,
    method: str = "newton_schulz",
    steps: int = 5,
    polish: int = 4,
    rtol: float = 1e-3,
    precision: str = "full",
) -> Tensor:
    """The polar factor ``U Vᵀ`` of ``g = U Σ Vᵀ`` (batched over leading dims): the dual map
    of the spectral norm.

    ``newton_schulz`` (default, matmuls only): ``steps`` quintic steps with Muon's coefficients
    bring singular values above about ``1e-3·σ₁`` into [0.7, 1.2]; ``polish`` cubic steps
    ``x ↦ 1.5x − 0.5x³`` then pull them to 1 to ~1e-6, so the result has spectral norm 1 and
    ``⟨g, UVᵀ⟩`` is the nuclear norm. Singular values far below ``σ₁`` (rounding noise) stay
    small instead of becoming full-size directions: the iteration is a soft threshold.
    ``svd`` is exact and treats singular values below ``rtol·σ₁`` as zero, for the same reason.
    A zero matrix maps to zero.

    ``precision`` (Newton–Schulz only): ``"full"`` runs in float32 (float64 for float64
    input). ``"mixed"`` runs every step but the last in bfloat16, as Muon does: 3–4× faster
    where bfloat16 matmuls are native (CUDA, CPUs with AMX; elsewhere emulated and far
    slower), with the same spectral norm and ``⟨g, UVᵀ⟩`` within 1e-4 on full-rank input. But
    bfloat16 rounding (~4e-3) lies above the soft threshold, so a low-rank ``g`` gains
    full-size spurious directions (a rank-1 512 × 512 matrix: about 250 singular values
    above 0.05 besides its one).
    """
    if method not in ("newton_schulz", "svd"):
        raise ValueError(
            f"unknown orthogonalization method {method!r}: use 'newton_schulz' or 'svd'"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
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
        if precision == "mixed" and not native_bfloat16(x.device):
            warnings.warn(
                f"precision='mixed' on {x.device}, where bfloat16 matmuls are emulated: "
                "slower than precision='full' (see modnorm.linalg.native_bfloat16)",
                RuntimeWarning,
                stacklevel=2,
            )
        low = torch.bfloat16 if precision == "mixed" else dtype
        x = (x / scale).to(low)
        a, b, c = _QUINTIC
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
        # The quintic overshoots up to ~1.2; the cubic step's fixed point at 1 is stable only
        # below √3 and it maps (1, √3) back under 1, so polishing converges from there
        # (errors 0.3 → 0.12 → 0.02 → 7e-4 → 1e-6): bfloat16's 4e-3 only matters in the last.
        for i in range(polish):
            if i == polish - 1:
                x = x.to(dtype)
            x = 1.5 * x - 0.5 * (x @ x.mT) @ x
        out = x.to(dtype)
    if transpose:
        out = out.mT
    return out.to(g.dtype)
