"""Atoms: modules with weights, each with its own norm, dual map and projection (DESIGN §1).

The scale factors live in the forward pass, so a weight is a plain matrix whose norm reads
directly: at orthogonal initialization a Linear's weight has spectral norm 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modnorm.linalg import orthogonalize, spectral_norm
from modnorm.modules import Atom


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Linear(Atom):
    """``y = √(out/in) · W x``. Norm: the spectral norm ``‖W‖₂`` (the RMS→RMS operator norm
    of the map). Dual map: ``U Vᵀ`` of ``G = U Σ Vᵀ``. Weight shape ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, mass: float = 1.0) -> None:
        super().__init__(mass)
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.scale = math.sqrt(out_features / in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._v: Tensor
        # Warm start of the spectral-norm iteration; not part of the state.
        self.register_buffer("_v", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal initialization: every singular value 1 (drawn from torch's global RNG)."""
        nn.init.orthogonal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(x, self.weight)

    def atom_norm(self, t: Tensor) -> Tensor:
        sigma, v = spectral_norm(t, self._v if self._v.numel() else None)
        self._v = v
        return sigma

    def atom_dual(self, g: Tensor, method: str = "newton_schulz") -> Tensor:
        return orthogonalize(g, method)

    @torch.no_grad()
    def project_(self) -> Linear:
        u, _, vh = torch.linalg.svd(self.weight.float(), full_matrices=False)
        self.weight.copy_(u @ vh)
        return self


class Embedding(Atom):
    """``y = √d · W[x]`` for integer ``x``. Norm: the largest ℓ₂ norm of a row. Dual map: each
    row divided by its ℓ₂ norm (zero rows stay zero). Weight shape ``(num_embeddings, d)``."""

    def __init__(self, num_embeddings: int, dim: int, mass: float = 1.0) -> None:
        super().__init__(mass)
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.in_features = None  # the input is a tensor of indices
        self.out_features = _positive_int("dim", dim)
        self.scale = math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim))
        self.reset_parameters()

    def _name(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.out_features})"

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.out_features}, mass={self.mass:.4g}"

    def reset_parameters(self) -> None:
        """Unit rows, uniformly distributed on the sphere."""
        with torch.no_grad():
            nn.init.normal_(self.weight)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{self._name()} takes integer indices, got a {x.dtype} tensor")
        return self.scale * F.embedding(x, self.weight)

    def atom_norm(self, t: Tensor) -> Tensor:
        return t.float().norm(dim=1).max()

    def atom_dual(self, g: Tensor, method: str = "newton_schulz") -> Tensor:
        g32 = g.float()
        n = g32.norm(dim=1, keepdim=True)
        return torch.where(n > 0, g32 / n.clamp_min(torch.finfo(torch.float32).tiny), 0.0).to(
            g.dtype
        )

    @torch.no_grad()
    def project_(self) -> Embedding:
        n = self.weight.norm(dim=1, keepdim=True)
        self.weight.copy_(torch.where(n > 0, self.weight / n.clamp_min(1e-30), self.weight))
        return self


class Conv2d(Atom):
    """``y = √(out/in)/k² · conv(x, W)``. Norm: the largest spectral norm over the ``k²``
    kernel positions. Dual map: orthogonalize at every position. Weight ``(out, in, k, k)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        mass: float = 1.0,
    ) -> None:
        super().__init__(mass)
        self.in_features = _positive_int("in_channels", in_channels)
        self.out_features = _positive_int("out_channels", out_channels)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.stride = _positive_int("stride", stride)
        self.padding = kernel_size // 2 if padding is None else padding
        self.scale = math.sqrt(out_channels / in_channels) / kernel_size**2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self._v: Tensor
        self.register_buffer("_v", torch.empty(0), persistent=False)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, mass={self.mass:.4g}"
        )

    def reset_parameters(self) -> None:
        """Orthogonal at every kernel position."""
        with torch.no_grad():
            for i in range(self.kernel_size):
                for j in range(self.kernel_size):
                    nn.init.orthogonal_(self.weight[:, :, i, j])

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.conv2d(x, self.weight, None, self.stride, self.padding)

    def atom_norm(self, t: Tensor) -> Tensor:
        mats = t.flatten(2).permute(2, 0, 1)  # (k², out, in)
        warm = self._v if self._v.shape[:1] == mats.shape[:1] else None
        sigmas, vs = [], []
        for i, m in enumerate(mats):
            s, v = spectral_norm(m, None if warm is None else warm[i])
            sigmas.append(s)
            vs.append(v)
        self._v = torch.stack(vs)
        return torch.stack(sigmas).max()

    def atom_dual(self, g: Tensor, method: str = "newton_schulz") -> Tensor:
        mats = g.flatten(2).permute(2, 0, 1)
        return orthogonalize(mats, method).permute(1, 2, 0).reshape(g.shape)

    @torch.no_grad()
    def project_(self) -> Conv2d:
        mats = self.weight.float().flatten(2).permute(2, 0, 1)
        u, _, vh = torch.linalg.svd(mats, full_matrices=False)
        self.weight.copy_((u @ vh).permute(1, 2, 0).reshape(self.weight.shape))
        return self
