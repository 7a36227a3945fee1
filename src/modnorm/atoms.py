"""Atoms: modules with weights, each with its own norm, dual map and projection (DESIGN §1).

The scale factors live in the forward pass, so a weight is a plain matrix whose norm reads
directly: at orthogonal initialization a Linear's weight has spectral norm 1.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modnorm.linalg import orthogonalize, spectral_norms_batches
from modnorm.modules import Atom


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class _MatrixAtom(Atom):
    """An atom whose weight is a stack of ``P`` matrices ``(P, m, n)`` (one for a Linear, one
    per kernel position for a Conv2d, one for an unfolded Conv2d), normed by the largest
    spectral norm among them.

    Norms and dual maps of many such atoms are computed together: matrices of one shape are
    stacked, so a network's spectral norms cost one batched Lanczos run per shape and its
    orthogonalizations one batched Newton–Schulz run per shape, whatever the depth.
    """

    _v: Tensor  # (P, n) warm starts of the spectral-norm iteration; not part of the state

    @classmethod
    def batch_family(cls) -> type[Atom]:
        return _MatrixAtom

    def _mats(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _unmats(self, mats: Tensor, like: Tensor) -> Tensor:
        raise NotImplementedError

    def _mat_shape(self) -> tuple[int, int]:
        """``(m, n)`` of each of the weight's matrices, from its (global) shape alone."""
        m, n = self._mats(torch.empty(self.weight.shape, device="meta")).shape[1:]
        return m, n

    def atom_norm(self, t: Tensor) -> Tensor:
        return type(self).atom_norms([self], [t])[0]

    def atom_dual(
        self, g: Tensor, method: str = "newton_schulz", precision: str = "full"
    ) -> Tensor:
        return type(self).atom_duals([self], [g], method, precision)[0]

    @classmethod
    def atom_norms(cls, atoms: list[Atom], tensors: list[Tensor]) -> list[Tensor]:
        matrix_atoms = cast(list[_MatrixAtom], atoms)
        mats = [a._mats(t) for a, t in zip(matrix_atoms, tensors, strict=True)]
        out: list[Tensor] = [torch.zeros(())] * len(atoms)
        groups = _groups(mats)
        stacks, warms = [], []
        for idx in groups:
            stacks.append(torch.cat([mats[i] for i in idx]))
            warm = [cast(Tensor, matrix_atoms[i]._v) for i in idx]
            ok = all(w.shape == mats[i].shape[::2] for w, i in zip(warm, idx, strict=True))
            warms.append(torch.cat(warm) if ok else None)
        # all shapes side by side: one host synchronization per Lanczos check, not per shape
        for idx, (sigma, v) in zip(groups, spectral_norms_batches(stacks, warms), strict=True):
            start = 0
            for i in idx:
                p = mats[i].shape[0]
                matrix_atoms[i]._v = v[start : start + p]
                out[i] = sigma[start : start + p].max()
                start += p
        return out

    @classmethod
    def atom_duals(
        cls, atoms: list[Atom], tensors: list[Tensor], method: str, precision: str = "full"
    ) -> list[Tensor]:
        matrix_atoms = cast(list[_MatrixAtom], atoms)
        mats = [a._mats(t) for a, t in zip(matrix_atoms, tensors, strict=True)]
        out: list[Tensor] = [torch.zeros(())] * len(atoms)
        for idx in _groups(mats):
            dual = orthogonalize(torch.cat([mats[i] for i in idx]), method, precision=precision)
            start = 0
            for i in idx:
                p = mats[i].shape[0]
                out[i] = matrix_atoms[i]._unmats(dual[start : start + p], tensors[i])
                start += p
        return out


def _unit(g: Tensor, n: Tensor) -> Tensor:
    """``g / n`` where ``n > 0``, zero where ``n = 0`` (a zero gradient has a zero dual)."""
    return torch.where(n > 0, g / n.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def _groups(mats: list[Tensor]) -> list[list[int]]:
    """Indices of the matrices that can be stacked: same shape, dtype and device."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((tuple(m.shape[1:]), m.dtype, m.device), []).append(i)
    return list(groups.values())


class Linear(_MatrixAtom):
    """``y = √(out/in) · W x``. Norm: the spectral norm ``‖W‖₂`` (the RMS→RMS operator norm
    of the map). Dual map: ``U Vᵀ`` of ``G = U Σ Vᵀ``. Weight shape ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, mass: float = 1.0) -> None:
        super().__init__(mass)
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.scale = math.sqrt(out_features / in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.register_buffer("_v", torch.empty(0), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthogonal initialization: every singular value 1 (drawn from torch's global RNG)."""
        nn.init.orthogonal_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(x, self.weight)

    def _mats(self, t: Tensor) -> Tensor:
        return t[None]

    def _unmats(self, mats: Tensor, like: Tensor) -> Tensor:
        return mats[0]

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

    def atom_dual(
        self, g: Tensor, method: str = "newton_schulz", precision: str = "full"
    ) -> Tensor:
        g32 = g.float()
        return _unit(g32, g32.norm(dim=1, keepdim=True)).to(g.dtype)

    @torch.no_grad()
    def project_(self) -> Embedding:
        n = self.weight.norm(dim=1, keepdim=True)
        self.weight.copy_(torch.where(n > 0, self.weight / n.clamp_min(1e-30), self.weight))
        return self


class Conv2d(_MatrixAtom):
    """``y = √(out/in)/k² · conv(x, W)``. Norm: the largest spectral norm over the ``k²``
    kernel positions. Dual map: orthogonalize at every position. Weight ``(out, in, k, k)``.

    With ``unfolded=True`` the kernel is one ``(out, in·k²)`` matrix, the map from a pixel's
    ``k × k`` patch to its output (as Muon orthogonalizes a convolution): ``y = √(out/in)/k ·
    conv(x, W)``, normed by that matrix's spectral norm, dualized by orthogonalizing it, and
    initialized orthogonal. Both are well-normed pixel by pixel (a patch holds ``k²``
    pixels, so its norm is at most ``k`` times the largest pixel's)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        mass: float = 1.0,
        unfolded: bool = False,
    ) -> None:
        super().__init__(mass)
        self.in_features = _positive_int("in_channels", in_channels)
        self.out_features = _positive_int("out_channels", out_channels)
        self.kernel_size = _positive_int("kernel_size", kernel_size)
        self.stride = _positive_int("stride", stride)
        self.padding = kernel_size // 2 if padding is None else padding
        if not isinstance(unfolded, bool):
            raise ValueError(f"unfolded must be a bool, got {unfolded!r}")
        self.unfolded = unfolded
        per_position = kernel_size if unfolded else kernel_size**2
        self.scale = math.sqrt(out_channels / in_channels) / per_position
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.register_buffer("_v", torch.empty(0), persistent=False)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, mass={self.mass:.4g}"
            + (", unfolded=True" if self.unfolded else "")
        )

    def reset_parameters(self) -> None:
        """Orthogonal at every kernel position (unfolded: as one matrix)."""
        with torch.no_grad():
            if self.unfolded:
                nn.init.orthogonal_(self.weight.view(self.out_features, -1))
                return
            for i in range(self.kernel_size):
                for j in range(self.kernel_size):
                    nn.init.orthogonal_(self.weight[:, :, i, j])

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.conv2d(x, self.weight, None, self.stride, self.padding)

    def _mats(self, t: Tensor) -> Tensor:
        if self.unfolded:
            return t.flatten(1)[None]  # (1, out, in·k²): columns in (in, kh, kw) order
        return t.flatten(2).permute(2, 0, 1)  # (k², out, in): one matrix per position

    def _unmats(self, mats: Tensor, like: Tensor) -> Tensor:
        if self.unfolded:
            return mats[0].reshape(like.shape)
        return mats.permute(1, 2, 0).reshape(like.shape)

    @torch.no_grad()
    def project_(self) -> Conv2d:
        mats = self._mats(self.weight.float())
        u, _, vh = torch.linalg.svd(mats, full_matrices=False)
        self.weight.copy_(self._unmats(u @ vh, self.weight))
        return self


class _VectorAtom(Atom):
    """An atom whose weight is one vector over one dimension of its input: the last (the
    features), or ``dim`` (1 for the channels of ``(B, C, H, W)`` images)."""

    # No weight decay: decay pulls a gain toward 0, switching its features off, not toward
    # its identity at 1; GPT recipes (nanoGPT's AdamW groups) decay neither gains nor biases.
    decays = False

    def __init__(self, features: int, mass: float = 1.0, dim: int = -1) -> None:
        super().__init__(mass)
        self.in_features = self.out_features = _positive_int("features", features)
        if not isinstance(dim, int) or isinstance(dim, bool):
            raise TypeError(f"dim must be an int, got {dim!r}")
        self.dim = dim
        self.weight = nn.Parameter(torch.empty(features))
        self.reset_parameters()

    def _name(self) -> str:
        where = "" if self.dim == -1 else f", dim={self.dim}"
        return f"{self._get_name()}({self.out_features}{where})"

    def extra_repr(self) -> str:
        where = "" if self.dim == -1 else f", dim={self.dim}"
        return f"{self.out_features}, mass={self.mass:.4g}{where}"

    def _vector(self, x: Tensor) -> Tensor:
        """The weight, shaped to broadcast along ``dim`` of ``x`` (checked)."""
        if not -x.ndim <= self.dim < x.ndim or x.shape[self.dim] != self.out_features:
            where = "the last dimension" if self.dim == -1 else f"dimension {self.dim}"
            raise ValueError(
                f"{self._name()} acts on {where}, of size {self.out_features}, "
                f"but its input has shape {tuple(x.shape)}"
            )
        trailing = x.ndim - self.dim % x.ndim - 1
        return self.weight.view(-1, *[1] * trailing) if trailing else self.weight


class Bias(_VectorAtom):
    """``y = x + b``, ``b`` added along the last dimension (or ``dim``: ``Bias(C, dim=1)``
    is a convolution's per-channel bias). Norm: the RMS of ``b`` (the output moves by
    exactly that much, in the RMS norm). Dual map: ``√d·g/‖g‖₂``.
    Weight shape ``(d,)``, zero at initialization. Affine in weight and input together, so
    its sharpness is ``(0, 0, 0)``."""

    @property
    def sharpness(self) -> tuple[float, float, float]:
        return (0.0, 0.0, 0.0)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + self._vector(x)

    def atom_norm(self, t: Tensor) -> Tensor:
        return t.float().square().mean().sqrt()

    def atom_dual(
        self, g: Tensor, method: str = "newton_schulz", precision: str = "full"
    ) -> Tensor:
        return _unit(g.float(), self.atom_norm(g)).to(g.dtype)

    @torch.no_grad()
    def project_(self) -> Bias:
        n = self.atom_norm(self.weight)
        if n > 0:
            self.weight.div_(n)
        return self


class Gain(_VectorAtom):
    """``y = g ⊙ x``, ``g`` multiplying along the last dimension (a LayerNorm's weight) or
    ``dim``. Norm: ``max |gᵢ|``, the RMS→RMS operator norm of ``diag(g)``. Dual map:
    ``sign(g)``. Weight shape ``(d,)``, ones at initialization (unit norm, as an orthogonal
    Linear). Bilinear in weight and input, as a Linear."""

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x * self._vector(x)

    def atom_norm(self, t: Tensor) -> Tensor:
        return t.float().abs().max()

    def atom_dual(
        self, g: Tensor, method: str = "newton_schulz", precision: str = "full"
    ) -> Tensor:
        return torch.sign(g)

    @torch.no_grad()
    def project_(self) -> Gain:
        """Every entry to ``±1`` (``diag(g)``'s polar factor); zero entries stay zero."""
        self.weight.copy_(torch.sign(self.weight))
        return self
