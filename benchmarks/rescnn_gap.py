"""Where modnorm-adam's loss gap on the 2-block ResCNN comes from (issue #6).

On the ResCNN over depth (digits as 8 × 8 images with fresh input noise, width 16, batch
128, linear decay), at 1000 steps and 2 blocks modnorm-adam reaches a training loss of 0.442
where torch Adam on the plain ``torch.nn`` ResCNN reaches 0.344 and Muon 0.298; at 16 blocks
modnorm-adam is between them. This trains the 2-block ResCNN under variants that each change
one thing, to tell the network from the optimizer:

* the optimizer: ``torch.optim.Adam`` on modnorm's own ResCNN;
* the plain ResCNN (``baselines.torch_rescnn``) under torch Adam with biases and GroupNorm's
  affine weights in only some parts (or none), with modnorm's residuals
  ``(1 − 1/L)·x + (1/L)·block(x)``, or with a mean subtracted after the activation;
* modnorm's ResCNN with per-channel biases after the convolutions, a per-channel `Gain`
  and/or `Bias` after each RMSDivide, all of them (``ResCNN(affine_mass=0.25)``), without
  the MeanSubtract, or with plain residuals ``x + block(x)``.

Every variant on its grid (seed 0, about 20 minutes on 2 cores), then seeds 1 and 2 around
the best lrs and the deep network (benchmarks/RESULTS.md lists each command):

    python -m benchmarks.rescnn_gap --jobs 2 --seeds 0
    python -m benchmarks.rescnn_gap --jobs 2 --seeds 1,2 --variants modnorm-adam --lrs=1,2,3
    python -m benchmarks.rescnn_gap --jobs 2 --blocks 16 --seeds 0,1,2 --lrs=1,2,3 \
        --variants modnorm-adam
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.adam_gap import Job, ablate, train_row
from modnorm import baselines, compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.atoms import Bias, Conv2d, Gain, Linear
from modnorm.bonds import AvgPool, Flatten, Identity, MeanSubtract, RMSDivide
from modnorm.modules import Module

STEPS, WIDTH = 1000, 16
MODNORM_LRS = [-2, -1, 0, 1, 2, 3, 4]
TORCH_LRS = [-8, -7, -6, -5, -4, -3, -2]


def modnorm_rescnn(
    width: int,
    blocks: int,
    mean: bool = True,
    residual: str = "convex",
    norm_gain: float | None = None,
    norm_bias: float | None = None,
    conv_bias: float | None = None,
) -> Module:
    """`compounds.ResCNN` on 1-channel 8 × 8 images (the defaults: the same network, its
    weights drawn in the same order) without the MeanSubtract, with plain residuals, with a
    per-channel `Gain` (of mass ``norm_gain``) or `Bias` (``norm_bias``) after each
    RMSDivide (GroupNorm's affine weights), or with a `Bias` of mass ``conv_bias`` after each
    Conv2d and the head (all three of one mass: ``ResCNN(affine_mass=...)``)."""
    dims = (1, 2, 3)

    def conv(d_in: int) -> Module:
        c = Conv2d(d_in, width, 3)
        return c if conv_bias is None else Bias(width, conv_bias, dim=1) @ c

    initial = conv(1)
    norm: Module = RMSDivide(dims)
    if norm_gain is not None:
        norm = Gain(width, norm_gain, dim=1) @ norm
    if norm_bias is not None:
        norm = Bias(width, norm_bias, dim=1) @ norm
    residue = compounds._activation("abs") @ conv(width) @ norm
    if mean:
        residue = MeanSubtract(dims) @ residue
    if residual == "convex":
        stack = compounds._residual(residue, blocks, 1 / blocks) ** blocks
    else:
        stack = (Identity() + residue) ** blocks
    stack.tare(20.0)
    head: Module = Linear(width, 10)
    if conv_bias is not None:
        head = Bias(10, conv_bias) @ head
        head.tare(1.0)
    return head @ Flatten() @ AvgPool() @ stack @ initial


class _Convex(nn.Module):
    """``(1 − 1/L)·x + (1/L)·block(x)``: modnorm's residual in plain ``torch.nn``."""

    def __init__(self, body: nn.Module, blocks: int) -> None:
        super().__init__()
        self.body, self.blocks = body, blocks

    def forward(self, x: Tensor) -> Tensor:
        return (1 - 1 / self.blocks) * x + self.body(x) / self.blocks


class _MeanSubtract(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x - x.mean(dim=(1, 2, 3), keepdim=True)


AFFINE = ("stem", "norm", "conv", "head")  # the plain ResCNN's parts with biases or affine weights


def torch_rescnn(
    width: int,
    blocks: int,
    affine: tuple[str, ...] = AFFINE,
    residual: str = "plain",
    mean: bool = False,
) -> nn.Module:
    """`baselines.torch_rescnn` (the defaults) with biases and GroupNorm's affine weights in
    only some parts (``affine``: of the stem convolution, the GroupNorms, the blocks'
    convolutions, the head), with modnorm's residuals, or with a mean subtracted after the
    activation."""
    if set(affine) == set(AFFINE) and residual == "plain" and not mean:
        return baselines.torch_rescnn(1, 10, width, blocks)
    unknown = set(affine) - set(AFFINE)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}: choose from {list(AFFINE)}")

    def body() -> nn.Module:
        layers = [
            nn.GroupNorm(1, width, affine="norm" in affine),
            nn.Conv2d(width, width, 3, padding=1, bias="conv" in affine),
            baselines._Activation("abs"),
        ]
        return nn.Sequential(*layers, *([_MeanSubtract()] if mean else []))

    wrap = (lambda b: _Convex(b, blocks)) if residual == "convex" else baselines._Block
    stack = [wrap(body()) for _ in range(blocks)]  # drawn before the stem, as the baseline's
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1, bias="stem" in affine),
        *stack,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10, bias="head" in affine),
    )


def _torch_adam(net: nn.Module, lr: float) -> Any:
    return torch.optim.Adam(net.parameters(), lr=lr)


def _modnorm_adam(net: Module, lr: float) -> Any:
    return mn_optim.Adam(net, lr=lr)


Variant = tuple[Callable[[int, int], Any], Callable[[Any, float], Any], list[int]]

VARIANTS: dict[str, Variant] = {
    "modnorm-adam": (lambda w, b: compounds.ResCNN(1, 10, w, b), _modnorm_adam, MODNORM_LRS),
    "torch Adam on modnorm's ResCNN": (
        lambda w, b: compounds.ResCNN(1, 10, w, b),
        _torch_adam,
        TORCH_LRS,
    ),
    "torch Adam": (torch_rescnn, _torch_adam, TORCH_LRS),
    "torch Adam: no biases or affine": (
        lambda w, b: torch_rescnn(w, b, affine=()),
        _torch_adam,
        TORCH_LRS,
    ),
    "torch Adam: biases in the convolutions only": (
        lambda w, b: torch_rescnn(w, b, affine=("stem", "conv")),
        _torch_adam,
        TORCH_LRS,
    ),
    "torch Adam: GroupNorm's affine only": (
        lambda w, b: torch_rescnn(w, b, affine=("norm",)),
        _torch_adam,
        TORCH_LRS,
    ),
    "torch Adam: the head's bias only": (
        lambda w, b: torch_rescnn(w, b, affine=("head",)),
        _torch_adam,
        TORCH_LRS,
    ),
    "torch Adam: modnorm's residuals": (
        lambda w, b: torch_rescnn(w, b, residual="convex"),
        _torch_adam,
        TORCH_LRS,
    ),
    "torch Adam: mean subtracted": (
        lambda w, b: torch_rescnn(w, b, mean=True),
        _torch_adam,
        TORCH_LRS,
    ),
    "modnorm-adam: conv and head biases (mass 1)": (
        lambda w, b: modnorm_rescnn(w, b, conv_bias=1.0),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "modnorm-adam: conv and head biases (mass 0.25)": (
        lambda w, b: modnorm_rescnn(w, b, conv_bias=0.25),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "modnorm-adam: gain and bias after RMSDivide (mass 0.25)": (
        lambda w, b: modnorm_rescnn(w, b, norm_gain=0.25, norm_bias=0.25),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "modnorm-adam: gain after RMSDivide (mass 0.25)": (
        lambda w, b: modnorm_rescnn(w, b, norm_gain=0.25),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "modnorm-adam: bias after RMSDivide (mass 0.25)": (
        lambda w, b: modnorm_rescnn(w, b, norm_bias=0.25),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "modnorm-adam: affine_mass 0.25 (all of them)": (
        lambda w, b: compounds.ResCNN(1, 10, w, b, affine_mass=0.25),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "torch Adam on modnorm's ResCNN with conv and head biases": (
        lambda w, b: modnorm_rescnn(w, b, conv_bias=1.0),
        _torch_adam,
        TORCH_LRS,
    ),
    "modnorm-adam: no MeanSubtract": (
        lambda w, b: modnorm_rescnn(w, b, mean=False),
        _modnorm_adam,
        MODNORM_LRS,
    ),
    "modnorm-adam: plain residuals": (
        lambda w, b: modnorm_rescnn(w, b, residual="plain"),
        _modnorm_adam,
        MODNORM_LRS,
    ),
}


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    make_net, make_opt, _ = VARIANTS[name]
    cfg = ex.SweepConfig(model="rescnn", steps=steps, input_noise=1.0, depth=blocks)
    data = mn_data.load("digits", image=True, input_noise=1.0)

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = make_net(width, depth)
        return net, [make_opt(net, lr)]

    return train_row(job, cfg, data, build)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        {n: v[2] for n, v in VARIANTS.items()},
        run,
        WIDTH,
        Path(__file__).parent / "results" / "rescnn_gap",
        lambda w, b, n: f"width {w}, {b} blocks, digits as images; train loss ({n} steps)",
        STEPS,
    )


if __name__ == "__main__":
    main()
