"""Standard practice: the compounds' architectures as plain ``torch.nn`` models with PyTorch's
default initialization, biases, ``1/√d_head`` attention and unweighted residuals
``x + block(x)``, the way a user writes them before reaching for μP or modnorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Block(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ("relu", "gelu", "abs"):
            raise ValueError(f"unknown activation {name!r}: choose one of ['abs', 'gelu', 'relu']")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        if self.name == "relu":
            return F.relu(x)
        if self.name == "gelu":
            return F.gelu(x)
        return x.abs()


def torch_mlp(
    in_features: int, out_features: int, width: int, depth: int = 3, activation: str = "relu"
) -> nn.Module:
    """``depth`` ``nn.Linear`` layers with an activation between them."""
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = [in_features] + [width] * (depth - 1) + [out_features]
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(_Activation(activation))
    return nn.Sequential(*layers)


def _residual_blocks(
    layer: Callable[[], list[nn.Module]], num_blocks: int, block_depth: int
) -> list[nn.Module]:
    return [
        _Block(nn.Sequential(*[m for _ in range(block_depth) for m in layer()]))
        for _ in range(num_blocks)
    ]


def torch_resmlp(
    in_features: int,
    out_features: int,
    width: int,
    num_blocks: int,
    block_depth: int = 1,
    activation: str = "abs",
) -> nn.Module:
    """Pre-norm residual MLP: blocks ``x + act(Linear(LayerNorm(x)))`` (``block_depth`` such
    layers per block), then LayerNorm and a linear head."""

    def layer() -> list[nn.Module]:
        return [nn.LayerNorm(width), nn.Linear(width, width), _Activation(activation)]

    blocks = _residual_blocks(layer, num_blocks, block_depth)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        *blocks,
        nn.LayerNorm(width),
        nn.Linear(width, out_features),
    )


def torch_rescnn(
    in_channels: int,
    out_features: int,
    width: int,
    num_blocks: int,
    block_depth: int = 1,
    activation: str = "abs",
) -> nn.Module:
    """Residual CNN: ``x + act(Conv(GroupNorm(x)))`` blocks, average pooling, a linear head."""

    def layer() -> list[nn.Module]:
        return [
            nn.GroupNorm(1, width),
            nn.Conv2d(width, width, 3, padding=1),
            _Activation(activation),
        ]

    blocks = _residual_blocks(layer, num_blocks, block_depth)
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, out_features),
    )


class _Attention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (
            z.view(b, t, self.num_heads, c // self.num_heads).transpose(1, 2) for z in (q, k, v)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class TorchGPT(nn.Module):
    """nanoGPT-style decoder: token + position embeddings, pre-norm attention and GELU MLP
    blocks, a final LayerNorm and a linear head."""

    def __init__(
        self, vocab_size: int, context: int, width: int, num_heads: int, num_blocks: int
    ) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self.blocks.append(
                _Block(nn.Sequential(nn.LayerNorm(width), _Attention(width, num_heads)))
            )
            mlp = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, 4 * width),
                nn.GELU(),
                nn.Linear(4 * width, width),
            )
            self.blocks.append(_Block(mlp))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
