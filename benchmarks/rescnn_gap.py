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

And where Muon's lead on the wide ResCNN comes from (``--width 128 --steps 200``):

* ``muon`` (the transfer harness's) on the plain ResCNN, without its affine weights, or with
  modnorm's residuals and mean; Muon on modnorm's affine ResCNN (`_muon_on_modnorm`, each
  kernel as one matrix or per kernel position);
* modnorm-dual on the affine ResCNN, with other masses (Muon's split, `muon_split.py`) or
  with unfolded convolutions (every one, or only the stem's or the blocks': the library's
  ``ResCNN(unfolded=True)``), and modnorm-adam likewise.

Every variant on its grid (seed 0, about 30 minutes on 2 cores at width 16), then seeds 1
and 2 around the best lrs and the deep network (benchmarks/RESULTS.md lists each command):

    python -m benchmarks.rescnn_gap --jobs 2 --seeds 0
    python -m benchmarks.rescnn_gap --jobs 2 --seeds 1,2 --variants modnorm-adam --lrs=1,2,3
    python -m benchmarks.rescnn_gap --jobs 2 --blocks 16 --seeds 0,1,2 --lrs=1,2,3 \
        --variants modnorm-adam
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import peers
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
MUON_LRS = [-8, -7, -6, -5, -4]
NS = (3.4445, -4.775, 2.0315)  # torch.optim.Muon's Newton–Schulz coefficients


def modnorm_rescnn(
    width: int,
    blocks: int,
    mean: bool = True,
    residual: str = "convex",
    norm_gain: float | None = None,
    norm_bias: float | None = None,
    conv_bias: float | None = None,
    unfolded: tuple[bool, bool] = (False, False),
    in_channels: int = 1,
) -> Module:
    """`compounds.ResCNN` on 1-channel 8 × 8 images (the defaults: the same network, its
    weights drawn in the same order) without the MeanSubtract, with plain residuals, with a
    per-channel `Gain` (of mass ``norm_gain``) or `Bias` (``norm_bias``) after each
    RMSDivide (GroupNorm's affine weights), or with a `Bias` of mass ``conv_bias`` after each
    Conv2d and the head (all three of one mass: ``ResCNN(affine_mass=...)``); ``unfolded``:
    whether the stem's and the blocks' Conv2d are ``unfolded`` (only the blocks':
    ``ResCNN(unfolded=True)``);
    ``in_channels``: the images' channels (digits have one)."""
    dims = (1, 2, 3)

    def conv(d_in: int, unfold: bool) -> Module:
        c = Conv2d(d_in, width, 3, unfolded=unfold)
        return c if conv_bias is None else Bias(width, conv_bias, dim=1) @ c

    initial = conv(in_channels, unfolded[0])
    norm: Module = RMSDivide(dims)
    if norm_gain is not None:
        norm = Gain(width, norm_gain, dim=1) @ norm
    if norm_bias is not None:
        norm = Bias(width, norm_bias, dim=1) @ norm
    residue = compounds._activation("abs") @ conv(width, unfolded[1]) @ norm
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


def affine_rescnn(
    width: int, blocks: int, unfolded: tuple[bool, bool], in_channels: int = 1
) -> Module:
    """``ResCNN(affine_mass=0.25)`` with the stem's and the blocks' Conv2d ``unfolded`` or
    not: `modnorm_rescnn` with its three affine options at that mass."""
    affine = {"norm_gain": 0.25, "norm_bias": 0.25, "conv_bias": 0.25}
    return modnorm_rescnn(width, blocks, **affine, unfolded=unfolded, in_channels=in_channels)


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


def _modnorm_dual(net: Module, lr: float) -> Any:
    return mn_optim.Dual(net, lr=lr)


def _muon(net: nn.Module, lr: float) -> Any:
    return peers.muon_optimizers(net, lr)


class _KernelMuon(torch.optim.Optimizer):
    """``torch.optim.Muon``'s step (its defaults, ``adjust_lr_fn="match_rms_adamw"``) on
    convolution kernels ``W`` of a layer computing ``scale · conv(x, W)``, taken as
    ``(out, in·k·k)`` matrices and made in the effective kernel ``scale · W``: what
    ``torch.optim.Muon`` does to a plain ``nn.Conv2d`` holding ``scale · W``."""

    def __init__(self, convs: list[Conv2d], lr: float, per_position: bool = False) -> None:
        if per_position and any(c.unfolded for c in convs):
            raise ValueError("per_position orthogonalizes a (folded) Conv2d's own matrices")
        self.convs = {id(c.weight): c for c in convs}
        self.per_position = per_position  # one (out, in) matrix per kernel position instead
        super().__init__([c.weight for c in convs], {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        # torch's own Newton–Schulz (bfloat16, its coefficients); private, and only in a torch
        # that has torch.optim.Muon, hence imported here
        from torch.optim._muon import _zeropower_via_newtonschulz as _zeropower

        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                w, grad = p.view(p.shape[0], -1), p.grad.view(p.shape[0], -1)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(w))
                buf.lerp_(grad, 1 - 0.95)
                conv = self.convs[id(p)]
                update, shape = grad.lerp(buf, 0.95), w.shape
                if self.per_position:  # the atom's own (out, in) matrices, as its dual map
                    mats = conv._mats(update.view(p.shape))
                    update = torch.stack([_zeropower(m, NS, 5, 1e-7) for m in mats])
                    update, shape = conv._unmats(update, p).reshape(w.shape), p.shape[:2]
                else:
                    update = _zeropower(update, NS, 5, 1e-7)
                w.mul_(1 - lr * 0.1)
                adjust = 0.2 * math.sqrt(max(shape)) / conv.scale
                w.add_(update, alpha=-lr * adjust)


def _muon_on_modnorm(net: Module, lr: float, per_position: bool = False) -> list[Any]:
    """``muon`` on a modnorm ResCNN, step for step as on the plain network holding its
    effective weights (``scale · W``): `_KernelMuon` for the hidden convolutions (all but the
    first), AdamW for the rest, each weight's lr (and decay) divided (multiplied) by its
    atom's ``scale``, since AdamW's step on ``W`` moves ``scale · W`` ``scale`` times as far."""
    convs = [m for m in net.modules() if isinstance(m, Conv2d)][1:]
    hidden = {id(c.weight) for c in convs}
    groups = [
        {"params": [m.weight], "lr": lr / s, "weight_decay": 0.01 * s}
        for m in net.modules()
        if hasattr(m, "weight") and id(m.weight) not in hidden
        for s in [getattr(m, "scale", 1.0)]
    ]
    return [torch.optim.AdamW(groups, lr=lr), _KernelMuon(convs, lr, per_position)]


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
    "muon": (torch_rescnn, _muon, MUON_LRS),
    "muon: no biases or affine": (lambda w, b: torch_rescnn(w, b, affine=()), _muon, MUON_LRS),
    "muon: modnorm's residuals and mean subtracted": (
        lambda w, b: torch_rescnn(w, b, residual="convex", mean=True),
        _muon,
        MUON_LRS,
    ),
    "muon on modnorm's ResCNN (affine_mass 0.25)": (
        lambda w, b: compounds.ResCNN(1, 10, w, b, affine_mass=0.25),
        _muon_on_modnorm,
        MUON_LRS,
    ),
    "muon on modnorm's ResCNN (affine_mass 0.25) orthogonalized per kernel position": (
        lambda w, b: compounds.ResCNN(1, 10, w, b, affine_mass=0.25),
        lambda net, lr: _muon_on_modnorm(net, lr, per_position=True),
        MUON_LRS,
    ),
    "modnorm-dual: affine_mass 0.25": (
        lambda w, b: compounds.ResCNN(1, 10, w, b, affine_mass=0.25),
        _modnorm_dual,
        MODNORM_LRS,
    ),
    **{
        f"{opt}: affine_mass 0.25 and unfolded convs": (  # every one, the stem's too
            lambda w, b: affine_rescnn(w, b, (True, True)),
            make,
            MODNORM_LRS,
        )
        for opt, make in [("modnorm-adam", _modnorm_adam), ("modnorm-dual", _modnorm_dual)]
    },
    # which convolution's unfolding moves modnorm-dual's lr with width: the stem's or the blocks'
    **{
        f"modnorm-dual: affine_mass 0.25 and {part} unfolded": (
            lambda w, b, unfolded=unfolded: affine_rescnn(w, b, unfolded),
            _modnorm_dual,
            MODNORM_LRS,
        )
        for part, unfolded in [("only the stem", (True, False)), ("only the blocks", (False, True))]
    },
    # the masses whose shares come closest to Muon's split (benchmarks/muon_split.py)
    **{
        f"{opt}: affine_mass 0.25 and head_mass {h}": (
            lambda w, b, h=h: compounds.ResCNN(1, 10, w, b, affine_mass=0.25, head_mass=h),
            make,
            MODNORM_LRS,
        )
        for opt, make in [("modnorm-adam", _modnorm_adam), ("modnorm-dual", _modnorm_dual)]
        for h in (4, 16)
    },
    **{
        f"{opt}: Muon's split at width {w0} (blocks {bm} head {h} affine 1/64)": (
            lambda w, b, bm=bm, h=h: compounds.ResCNN(
                1, 10, w, b, blocks_mass=bm, head_mass=h, affine_mass=1 / 64
            ),
            make,
            MODNORM_LRS,
        )
        for opt, make in [("modnorm-adam", _modnorm_adam), ("modnorm-dual", _modnorm_dual)]
        for w0, bm, h in [(16, 4, 1), (128, 8, 4)]
    },
}


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    make_net, make_opt, _ = VARIANTS[name]
    cfg = ex.SweepConfig(model="rescnn", steps=steps, input_noise=1.0, depth=blocks)
    data = mn_data.load("digits", image=True, input_noise=1.0)

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = make_net(width, depth)
        opts = make_opt(net, lr)
        return net, opts if isinstance(opts, list) else [opts]

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
