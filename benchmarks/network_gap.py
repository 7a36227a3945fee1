"""Which of the network's differences makes tuned Adam better on PyTorch's ResMLP (issue #6).

At width 1024 (the `wide` sweep's setting: digits with fresh input noise, 200 steps of 128,
linear decay) ``torch.optim.Adam`` tuned on the plain ``torch.nn`` ResMLP reaches a lower
loss than on modnorm's ResMLP (0.184 against 0.219, seed 0, `adam_gap.py`): the part of
modnorm-adam's gap that lies in the network. The two networks differ in six ways (the last
in two parts); this trains the ``torch.nn`` ResMLP under ``torch.optim.Adam`` with each one
changed to modnorm's, and with all six (which is modnorm's ResMLP, checked by a test):

* ``no biases``: the Linears without biases;
* ``no LayerNorm affine``: LayerNorms without gains and biases;
* ``no final LayerNorm``: the head reads the residual stream;
* ``convex residuals``: ``(1 − 1/L)·x + (1/L)·block(x)`` instead of ``x + block(x)``;
* ``modnorm's blocks``: ``MeanSubtract ∘ act ∘ Linear ∘ RMSDivide`` instead of
  ``act ∘ Linear ∘ LayerNorm``;
* ``modnorm's init``: orthogonal weights of singular values ``√(out/in)`` (modnorm's Linear
  at initialization), not PyTorch's uniform ``±1/√in``;
* ``modnorm's multipliers``: ``√(out/in) · W x`` with ``W`` orthogonal: the same functions at
  initialization as the previous one, but Adam's step on ``W`` moves the layer by
  ``√(out/in)`` times as much (the input layer 4× at width 1024, the head 0.1×).

    python -m benchmarks.network_gap --seeds 0,1,2 --jobs 2    # about 15 minutes on 2 cores
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.adam_gap import STEPS, Job, ablate, on_digits


@dataclasses.dataclass(frozen=True)
class Net:
    """The ResMLP's design; the defaults are `modnorm.baselines.torch_resmlp`'s."""

    bias: bool = True
    affine: bool = True  # LayerNorm gains and biases
    final_norm: bool = True
    convex: bool = False  # (1 − 1/L)·x + (1/L)·block(x), else x + block(x)
    modnorm_blocks: bool = False  # MeanSubtract ∘ act ∘ Linear ∘ RMSDivide
    init: str = "torch"  # "torch", "orthogonal" (modnorm's at init) or "multipliers"


class _Linear(nn.Linear):
    def __init__(self, fan_in: int, fan_out: int, net: Net) -> None:
        super().__init__(fan_in, fan_out, bias=net.bias)
        self.multiplier = 1.0
        if net.init != "torch":
            nn.init.orthogonal_(self.weight)
            scale = math.sqrt(fan_out / fan_in)
            if net.init == "multipliers":
                self.multiplier = scale
            else:
                with torch.no_grad():
                    self.weight.mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight) * self.multiplier
        return y if self.bias is None else y + self.bias


class _RMSDivide(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-12)  # modnorm's


class _Block(nn.Module):
    def __init__(self, width: int, blocks: int, net: Net) -> None:
        super().__init__()
        layer_norm = nn.LayerNorm(width, elementwise_affine=net.affine)
        self.norm = _RMSDivide() if net.modnorm_blocks else layer_norm
        self.linear = _Linear(width, width, net)
        self.mean_subtract = net.modnorm_blocks
        self.share = 1 / blocks if net.convex else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(self.norm(x)).abs()
        if self.mean_subtract:
            y = y - y.mean(-1, keepdim=True)
        if self.share is None:
            return x + y
        return (1 - self.share) * x + self.share * y


def resmlp(width: int, blocks: int, net: Net) -> nn.Sequential:
    """The ResMLP on 8×8 digits (64 features, 10 classes), its weights drawn in
    `modnorm.baselines.torch_resmlp`'s order (the blocks first)."""
    stack = [_Block(width, blocks, net) for _ in range(blocks)]
    layers: list[nn.Module] = [nn.Flatten(), _Linear(64, width, net), *stack]
    if net.final_norm:
        layers.append(nn.LayerNorm(width, elementwise_affine=net.affine))
    layers.append(_Linear(width, 10, net))
    return nn.Sequential(*layers)


MODNORM = Net(
    bias=False,
    affine=False,
    final_norm=False,
    convex=True,
    modnorm_blocks=True,
    init="multipliers",
)
VARIANTS: dict[str, Net] = {
    "torch ResMLP": Net(),
    "no biases": Net(bias=False),
    "no LayerNorm affine": Net(affine=False),
    "no final LayerNorm": Net(final_norm=False),
    "convex residuals": Net(convex=True),
    "modnorm's blocks": Net(modnorm_blocks=True),
    "modnorm's init": Net(init="orthogonal"),
    "modnorm's multipliers": Net(init="multipliers"),
    "all six: modnorm's ResMLP": MODNORM,
}
LRS = [-12, -11, -10, -9, -8, -7, -6]


def run(job: Job) -> dict[str, Any]:
    def make(width: int, blocks: int, lr: float) -> tuple[nn.Module, list[Any]]:
        model = resmlp(width, blocks, VARIANTS[job[0]])
        return model, [torch.optim.Adam(model.parameters(), lr=lr)]

    return on_digits(job, make)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        {name: LRS for name in VARIANTS},
        run,
        1024,
        Path(__file__).parent / "results" / "network_gap",
        lambda w, b, n: f"torch Adam, ResMLP width {w}, {b} blocks; train loss (last 10 % of {n})",
        STEPS,
    )


if __name__ == "__main__":
    main()
