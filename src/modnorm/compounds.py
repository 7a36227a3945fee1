"""Networks built only from the algebra, with the residual weights and masses of DESIGN §1.

A residual stack is ``((1 − 1/L)·Identity + (1/L)·block) ** L``: the ``1/L`` keeps the sum
of ``L`` aligned residues bounded, so the network stays well-normed at any depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from modnorm.atoms import Bias, Conv2d, Embedding, Gain, Linear
from modnorm.bonds import (
    Abs,
    AvgPool,
    CausalAttention,
    Flatten,
    Identity,
    LayerNorm,
    MeanSubtract,
    MergeHeads,
    Mul,
    Positions,
    RMSDivide,
    ScaledGELU,
    ScaledReLU,
    SplitHeads,
)
from modnorm.modules import Module, TupleModule

_ACTIVATIONS = {"relu": ScaledReLU, "gelu": ScaledGELU, "abs": Abs}


def _activation(name: str) -> Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _scaled_head(head: Module, output_scale: float, head_mass: float) -> Module:
    """``output_scale · head`` with the head's mass ``head_mass`` (built last, so the other
    weights' initialization does not depend on it). The output scale is μP's output
    multiplier; as a sensitivity it divides every atom's share of an update by as much, so a
    step of the same ``lr`` moves the weights less for the same bound on the change of the
    logits. The head's mass sets its share of each step against the rest of the network."""
    for name, value in (("output_scale", output_scale), ("head_mass", head_mass)):
        if not (isinstance(value, (int, float)) and 0 < value < math.inf):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    head.tare(head_mass)
    return head if output_scale == 1.0 else output_scale * head


def _residual(block: Module, num_blocks: int, share: float) -> Module:
    """``(1 − share)·Identity + share·block``."""
    return (1 - share) * Identity() + share * block


def MLP(  # noqa: N802 - constructors of modules read as classes
    in_features: int, out_features: int, width: int, depth: int = 3, activation: str = "relu"
) -> Module:
    """``depth`` Linear layers with an activation of sensitivity 1 between them, on inputs
    flattened to ``in_features``."""
    _positive("depth", depth)
    if depth == 1:
        return Linear(in_features, out_features) @ Flatten()
    net: Module = Linear(in_features, width) @ Flatten()
    for _ in range(depth - 2):
        net = Linear(width, width) @ _activation(activation) @ net
    return Linear(width, out_features) @ _activation(activation) @ net


def ResMLP(  # noqa: N802
    in_features: int,
    out_features: int,
    width: int,
    num_blocks: int,
    block_depth: int = 1,
    activation: str = "abs",
    blocks_mass: float = 1.0,
    output_scale: float = 1.0,
    head_mass: float = 1.0,
) -> Module:
    """Residual MLP: ``Linear ∘ blocks ∘ Linear ∘ Flatten``; each block is
    ``(MeanSubtract ∘ act ∘ Linear ∘ RMSDivide) ** block_depth`` (as the reference).
    ``output_scale`` multiplies the logits (μP's output multiplier) and ``head_mass`` is the
    head's mass (the input layer's is 1): both shift each step towards the head, which wide
    networks train better with (benchmarks/RESULTS.md)."""
    _positive("width", width)
    _positive("num_blocks", num_blocks)
    _positive("block_depth", block_depth)
    initial = Linear(in_features, width) @ Flatten()
    residue = MeanSubtract() @ _activation(activation) @ Linear(width, width) @ RMSDivide()
    blocks = _residual(residue**block_depth, num_blocks, 1 / num_blocks) ** num_blocks
    blocks.tare(blocks_mass)
    return _scaled_head(Linear(width, out_features), output_scale, head_mass) @ blocks @ initial


def ResCNN(  # noqa: N802
    in_channels: int,
    out_features: int,
    width: int,
    num_blocks: int,
    block_depth: int = 1,
    activation: str = "abs",
    kernel_size: int = 3,
    blocks_mass: float = 20.0,
    output_scale: float = 1.0,
    head_mass: float = 1.0,
    affine_mass: float | None = None,
    unfolded: bool = False,
) -> Module:
    """Residual CNN on ``(B, C, H, W)`` images: ``Linear ∘ Flatten ∘ AvgPool ∘ blocks ∘ Conv2d``;
    each block is ``(MeanSubtract ∘ act ∘ Conv2d ∘ RMSDivide) ** block_depth`` with the RMS
    taken over channels and pixels (as the reference, whose block mass is 20).
    ``output_scale`` and ``head_mass`` as `ResMLP`'s. With ``affine_mass`` every Conv2d gets
    a per-channel `Bias`, every RMSDivide a per-channel `Gain` and `Bias` (GroupNorm's affine
    weights) and the head a `Bias`, as ``torch.nn``'s ResCNN has them, each atom of that mass
    where a Conv2d has 1 (the blocks and the head are then tared as without them); ``None``
    (the default, as the reference) builds none. ``unfolded`` builds the blocks' Conv2d with
    ``unfolded=True`` (each kernel one ``(out, in·k²)`` matrix, as Muon orthogonalizes hidden
    weights); the stem, which sees pixels, stays per kernel position: the blocks' unfolding
    is what trains better, the stem's costs loss on one-channel images and ties on three
    (benchmarks/RESULTS.md)."""
    _positive("width", width)
    _positive("num_blocks", num_blocks)
    _positive("block_depth", block_depth)
    _check_affine_mass(affine_mass)
    dims = (1, 2, 3)

    def conv(d_in: int, unfold: bool) -> Module:
        c = Conv2d(d_in, width, kernel_size, unfolded=unfold)
        return c if affine_mass is None else Bias(width, affine_mass, dim=1) @ c

    def norm() -> Module:
        if affine_mass is None:
            return RMSDivide(dims)
        affine = Bias(width, affine_mass, dim=1) @ Gain(width, affine_mass, dim=1)
        return affine @ RMSDivide(dims)

    initial = conv(in_channels, False)
    residue = MeanSubtract(dims) @ _activation(activation) @ conv(width, unfolded) @ norm()
    blocks = _residual(residue**block_depth, num_blocks, 1 / num_blocks) ** num_blocks
    blocks.tare(blocks_mass)
    head = _scaled_head(_biased(affine_mass)(width, out_features), output_scale, head_mass)
    return head @ Flatten() @ AvgPool() @ blocks @ initial


def _check_affine_mass(affine_mass: float | None) -> None:
    if affine_mass is not None and (
        isinstance(affine_mass, bool)
        or not (isinstance(affine_mass, (int, float)) and 0 <= affine_mass < math.inf)
    ):
        raise ValueError(
            f"affine_mass must be a finite non-negative number or None, got {affine_mass!r}"
        )


def _biased(affine_mass: float | None) -> Callable[[int, int], Module]:
    """A Linear maker: with ``affine_mass`` each Linear is followed by a `Bias` of that mass."""
    _check_affine_mass(affine_mass)

    def linear(d_in: int, d_out: int) -> Module:
        lin = Linear(d_in, d_out)
        return lin if affine_mass is None else Bias(d_out, affine_mass) @ lin

    return linear


def Attention(  # noqa: N802
    width: int, num_heads: int, affine_mass: float | None = None
) -> Module:
    """Multi-head causal self-attention with ``1/d_head`` scaling: queries, keys and values
    are a tuple (ν = 3), scaled by 1/3 so the whole has ν = 1. With ``affine_mass`` each
    Linear but the keys' gets a `Bias` of that mass."""
    _positive("num_heads", num_heads)
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    linear = _biased(affine_mass)
    # No key bias: it adds q·b to every score of a query, which the softmax cancels, so its
    # gradient is rounding error, and a normalized step would scale that up to a full-size
    # random step each iteration (as in Whisper's attention, the keys have no bias).
    q, k, v = (
        SplitHeads(num_heads, width // num_heads)
        @ (Linear(width, width) if key else linear(width, width))
        for key in (False, True, False)
    )
    out = linear(width, width) @ MergeHeads(num_heads)
    return out @ CausalAttention() @ Mul(1 / 3) @ TupleModule(q, k, v)


def GPT(  # noqa: N802
    vocab_size: int,
    context: int,
    width: int,
    num_heads: int,
    num_blocks: int,
    blocks_mass: float = 5.0,
    output_scale: float = 1.0,
    head_mass: float = 1.0,
    affine_mass: float | None = None,
) -> Module:
    """Decoder-only transformer on token indices ``(B, T)``, ``T ≤ context``, returning logits
    ``(B, T, vocab_size)``: pre-norm attention and GELU MLP blocks with residual weights
    ``1/(2L)``, learned token and position embeddings (as the reference). ``output_scale``
    and ``head_mass`` as `ResMLP`'s. With ``affine_mass`` every Linear gets a `Bias` and every
    LayerNorm a `Gain` and a `Bias` (as in ``torch.nn``; the attention's keys excepted: see
    `Attention`), each atom of that mass where a Linear has 1 (the blocks and the head are
    then tared as without them); ``None`` (the default, as the reference) builds none."""
    _positive("vocab_size", vocab_size)
    _positive("context", context)
    _positive("num_blocks", num_blocks)
    linear = _biased(affine_mass)

    def norm() -> Module:
        if affine_mass is None:
            return LayerNorm()
        return Bias(width, affine_mass) @ Gain(width, affine_mass) @ LayerNorm()

    embed = 0.5 * Embedding(vocab_size, width) + 0.5 * (Embedding(context, width) @ Positions())
    embed.tare(1.0)
    attention = Attention(width, num_heads, affine_mass) @ norm()
    mlp = linear(4 * width, width) @ ScaledGELU() @ linear(width, 4 * width) @ norm()
    share = 1 / (2 * num_blocks)
    block = _residual(mlp, num_blocks, share) @ _residual(attention, num_blocks, share)
    blocks = block**num_blocks
    blocks.tare(blocks_mass)
    head = _scaled_head(linear(width, vocab_size), output_scale, head_mass)
    return head @ norm() @ blocks @ embed
