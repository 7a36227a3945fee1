"""modnorm: the modular norm for PyTorch networks, so that learning rates transfer across
width and depth (Large et al., "Scalable Optimization in the Modular Norm", NeurIPS 2024)."""

from modnorm import optim as optim
from modnorm.atoms import Bias, Conv2d, Embedding, Gain, Linear
from modnorm.bonds import (
    GELU,
    Abs,
    Add,
    AvgPool,
    CausalAttention,
    Flatten,
    Identity,
    LayerNorm,
    MeanSubtract,
    MergeHeads,
    Mul,
    Positions,
    ReLU,
    RMSDivide,
    Rotary,
    ScaledGELU,
    ScaledReLU,
    Softmax,
    SplitHeads,
)
from modnorm.compounds import GPT, MLP, Attention, ResCNN, ResMLP
from modnorm.modules import Atom, Bond, Compose, Module, TupleModule

__version__ = "0.1.0"

__all__ = [
    "GELU",
    "GPT",
    "MLP",
    "Abs",
    "Add",
    "Atom",
    "Attention",
    "AvgPool",
    "Bias",
    "Bond",
    "CausalAttention",
    "Compose",
    "Conv2d",
    "Embedding",
    "Flatten",
    "Gain",
    "Identity",
    "LayerNorm",
    "Linear",
    "MeanSubtract",
    "MergeHeads",
    "Module",
    "Mul",
    "Positions",
    "RMSDivide",
    "ReLU",
    "ResCNN",
    "ResMLP",
    "Rotary",
    "ScaledGELU",
    "ScaledReLU",
    "Softmax",
    "SplitHeads",
    "TupleModule",
]
