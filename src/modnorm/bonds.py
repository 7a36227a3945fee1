"""Bonds: modules without weights (mass 0). Each declares its sensitivity ``ν`` and, when it
is smooth, its sharpness ``(α, β, γ)``; activations are measured in the RMS norm over the
feature dimension (DESIGN §1)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from modnorm.modules import Bond, Compose, Module, Sharpness, Spec, _bump_mass_version

# max |GELU''(x)| = 2·φ(0), at x = 0.
_GELU_MAX_CURVATURE = 2 / math.sqrt(2 * math.pi)


class Identity(Bond):
    """``y = x`` (ν = 1)."""

    def forward(self, x: Any) -> Any:
        return x


class Add(Bond):
    """Sum of a tuple of tensors of one feature size (ν = 1 with tuples measured by the sum
    of norms)."""

    n_inputs = None

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        if spec is None:
            return (None,)
        known = {s for s in spec if s is not None}
        if len(known) > 1:
            raise ValueError(f"Add needs tensors of one feature size, got sizes {list(spec)}")
        return (known.pop() if known else None,)

    def forward(self, x: tuple[Tensor, ...]) -> Tensor:
        out = x[0]
        for t in x[1:]:
            out = out + t
        return out


class Mul(Bond):
    """``y = a·x`` for a number ``a`` (ν = |a|); applied to each member of a tuple."""

    def __init__(self, a: float) -> None:
        super().__init__()
        if not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"Mul needs a finite number, got {a!r}")
        self.a = float(a)

    @property
    def in_spec(self) -> Spec:
        return None  # any number of tensors

    def out_spec(self, spec: Spec) -> Spec:
        return spec

    @property
    def sensitivity(self) -> float:
        return abs(self.a)

    def _name(self) -> str:
        return f"Mul({self.a:.4g})"

    def extra_repr(self) -> str:
        return f"{self.a:.4g}"

    def forward(self, x: Any) -> Any:
        if isinstance(x, tuple):
            return tuple(self.a * t for t in x)
        return self.a * x


class _Elementwise(Bond):
    """A pointwise nonlinearity; remembers the feature size it was composed at, because the
    curvature of a pointwise map in the RMS norm grows like ``√d`` (a spike direction)."""

    features: int | None = None

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        if spec is not None and spec[0] is not None:
            self.features = spec[0]
        return spec


class ReLU(_Elementwise):
    """``max(x, 0)``. ν = 1/√2: the typical gain when half the units are active (the worst
    case is 1). Not smooth: no sharpness."""

    @property
    def sensitivity(self) -> float:
        return 1 / math.sqrt(2)

    @property
    def smooth(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class ScaledReLU(ReLU):
    """``√2·max(x, 0)``: ReLU scaled to ν = 1."""

    @property
    def sensitivity(self) -> float:
        return 1.0

    def forward(self, x: Tensor) -> Tensor:
        return math.sqrt(2) * F.relu(x)


class GELU(_Elementwise):
    """``x·Φ(x)``. ν = 1/√2 (typical gain, as ReLU; the worst-case slope is 1.13).
    Sharpness ``(0, 0, γ)`` with ``γ = max|GELU''|·√d = 0.80·√d`` in the RMS norm over ``d``
    features (all of ``Δx`` on one coordinate); unknown until the feature size is known."""

    gain = 1.0

    @property
    def sensitivity(self) -> float:
        return self.gain / math.sqrt(2)

    @property
    def sharpness(self) -> Sharpness | None:
        if self.features is None:
            return None
        return (0.0, 0.0, self.gain * _GELU_MAX_CURVATURE * math.sqrt(self.features))

    def forward(self, x: Tensor) -> Tensor:
        return self.gain * F.gelu(x)


class ScaledGELU(GELU):
    """``√2·GELU(x)``: GELU scaled to ν = 1."""

    gain = math.sqrt(2)


class Abs(_Elementwise):
    """``|x|`` (ν = 1). Not smooth: no sharpness."""

    @property
    def smooth(self) -> bool:
        return False

    def forward(self, x: Tensor) -> Tensor:
        return x.abs()


def _dims(dim: int | tuple[int, ...]) -> tuple[int, ...]:
    return (dim,) if isinstance(dim, int) else tuple(dim)


class MeanSubtract(Bond):
    """``x − mean(x)`` over ``dim`` (ν = 1: an orthogonal projection; linear)."""

    def __init__(self, dim: int | tuple[int, ...] = -1) -> None:
        super().__init__()
        self.dim = _dims(dim)

    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(dim=self.dim, keepdim=True)


class RMSDivide(Bond):
    """``x / rms(x)`` over ``dim``. For inputs of RMS at least ``input_rms`` (default 1):
    ν = ``1/input_rms`` and sharpness ``(0, 0, 3/input_rms²)``. A residual stream has RMS
    below 1; `modnorm.diagnostics.calibrate_` sets ``input_rms`` from a forward pass."""

    def __init__(
        self, dim: int | tuple[int, ...] = -1, eps: float = 1e-12, input_rms: float = 1.0
    ) -> None:
        super().__init__()
        self.dim = _dims(dim)
        self.eps = eps
        self.input_rms = input_rms

    @property
    def input_rms(self) -> float:
        return self._input_rms

    @input_rms.setter
    def input_rms(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"input_rms must be finite and positive, got {value}")
        self._input_rms = float(value)
        _bump_mass_version()  # the shares depend on every sensitivity

    @property
    def sensitivity(self) -> float:
        return 1.0 / self._input_rms

    @property
    def sharpness(self) -> Sharpness | None:
        return (0.0, 0.0, 3.0 / self._input_rms**2)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(dim=self.dim, keepdim=True) + self.eps)


def LayerNorm(dim: int | tuple[int, ...] = -1) -> Module:  # noqa: N802 - reads as a module
    """``RMSDivide ∘ MeanSubtract``: layer norm without gain or bias (ν = 1)."""
    return Compose(MeanSubtract(dim), RMSDivide(dim))


class Flatten(Bond):
    """Flatten all but the batch dimension (ν = 1)."""

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        return (None,)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(start_dim=1)


class AvgPool(Bond):
    """Adaptive average pooling of an image batch ``(B, C, H, W)`` to ``output_size`` (ν = 1:
    averaging never increases the RMS norm)."""

    def __init__(self, output_size: int | tuple[int, int] = 1) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(x, self.output_size)


class SplitHeads(Bond):
    """``(B, T, H·D) → (B, H, T, D)``, a reshape. Measured per head (as `CausalAttention`), a
    token's head can have up to ``√H`` times the token's RMS over all features (its features
    gathered in one head); ν = 1 is the typical gain, with features spread evenly over the
    heads (at an orthogonal initialization), not the worst case. With ``head_dim`` the input
    may also be a slice of whole heads (a tensor-parallel rank's ``H/tp`` of them)."""

    def __init__(self, num_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        if spec is None or spec[0] is None:
            return (None,)
        if spec[0] % self.num_heads:
            raise ValueError(f"{spec[0]} features do not split into {self.num_heads} heads")
        if self.head_dim is not None and spec[0] != self.num_heads * self.head_dim:
            raise ValueError(
                f"{spec[0]} features are not {self.num_heads} heads of {self.head_dim}"
            )
        return (spec[0] // self.num_heads,)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        d = self.head_dim or c // self.num_heads
        if c % d:
            raise ValueError(f"{c} features are not whole heads of {d}")
        return x.view(b, t, c // d, d).transpose(1, 2)


class MergeHeads(Bond):
    """``(B, H, T, D) → (B, T, H·D)`` (ν = 1, a reshape)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        if spec is None or spec[0] is None:
            return (None,)
        return (spec[0] * self.num_heads,)

    def forward(self, x: Tensor) -> Tensor:
        b, h, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, h * d)


class Rotary(Bond):
    """Rotary position embedding of ``(B, H, T, D)``: rotates feature pairs by angles that grow
    with the position (ν = 1: a rotation; linear)."""

    def __init__(self, base: float = 10000.0) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: Tensor) -> Tensor:
        t, d = x.shape[-2], x.shape[-1]
        if d % 2:
            raise ValueError(f"rotary embedding needs an even head dimension, got {d}")
        freq = self.base ** (
            -torch.arange(0, d // 2, device=x.device, dtype=torch.float32) / (d // 2)
        )
        angle = torch.arange(t, device=x.device, dtype=torch.float32)[:, None] * freq
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Softmax(Bond):
    """``softmax(x)`` over ``dim`` (ν = 1; its Jacobian has ℓ₂ norm at most 1/2). Smooth, but
    no sharpness constant is derived here."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    @property
    def sharpness(self) -> Sharpness | None:
        return None

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(x, dim=self.dim)


class CausalAttention(Bond):
    """``softmax(q kᵀ / d_head + causal mask) v`` on a tuple ``(q, k, v)`` of ``(B, H, T, D)``
    tensors. The ``1/d_head`` scaling (not ``1/√d_head``) keeps the scores bounded when ``q``
    and ``k`` align, as they do after training.

    Measured per head (each ``(b, h, t)`` row's RMS over ``D``, the worst row) with the tuple
    measured by the sum ``‖q‖ + ‖k‖ + ‖v‖``, and for inputs with that sum at most 1: ν = 1 and
    sharpness ``(0, 0, 1)``, both attained. Why: a score moves by ``|Δq·k + q·Δk|/D ≤
    ‖Δq‖‖k‖ + ‖q‖‖Δk‖``; the output ``Σ_s a_s v_s`` moves by a convex combination of the
    ``Δv_s`` plus the covariance, under the attention weights ``a``, of the score change with
    ``v``. Its second derivative is a sum of such covariances, ``Cov_a(Δs, Δṽ)``,
    ``Cov_a(Δ²s, v)`` and ``E_a[(xx̃ − E_a xx̃)(v − v̄)]`` (``x`` the centred score changes),
    each at most the product of the sizes involved; collected, the bilinear bound is
    ``max(‖q‖, ‖k‖, ‖v‖(1 + 2‖q‖‖k‖), 2‖v‖·max(‖q‖, ‖k‖)²)`` times the two steps' sizes, which
    is at most 1 when the sizes sum to 1 (``v`` alone: ``q = k = 0``, uniform attention, a step
    of the queries aligned with keys that sort the values reaches it). With ``1/√D`` the
    scores, and the curvature, grow like ``√D``. `SplitHeads` feeds it: see there for the
    per-head size."""

    n_inputs = 3

    @property
    def sharpness(self) -> Sharpness | None:
        return (0.0, 0.0, 1.0)

    def out_spec(self, spec: Spec) -> Spec:
        self._check_arity(spec)
        if spec is None:
            return (None,)
        q, k, v = spec
        if q is not None and k is not None and q != k:
            raise ValueError(f"queries have {q} features per head but keys have {k}")
        return (v,)

    def forward(self, x: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        q, k, v = x
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / q.shape[-1])


class Positions(Bond):
    """Token indices ``(B, T) → (T,)`` positions ``0 … T−1``, to feed a position embedding.
    ν = 0: the output does not depend on the input's values."""

    @property
    def sensitivity(self) -> float:
        return 0.0

    def forward(self, x: Tensor) -> Tensor:
        return torch.arange(x.shape[-1], device=x.device)
