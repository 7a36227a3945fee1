"""modnorm-adam with the masses that give torch Adam's split of a step among the layers
(issue #6; the split is measured by ``benchmarks/adam_split.py``).

Tuned torch Adam gives the ResMLP's input layer a fraction of its step that falls with
width (0.36, 0.09, 0.03 at widths 32, 256, 1024) and the blocks and head the rest; the
``compounds.ResMLP`` masses ``(blocks_mass, head_mass)`` closest to it are (2^-1, 2^-0.5),
(2^1.5, 2^2) and (2^3.5, 2^4). This trains modnorm-adam with each, and with the nominal
masses and the heavy head of `benchmarks/feature_learning.py`, at one width (the transfer
benchmark's setting: digits with fresh input noise, 2 blocks, 200 steps of 128); and the
nominal masses and width 1024's with an early boost of the lr (`boost`), as torch Adam's
first steps are larger; and, on the pixels mapped onto 256 features, the width rule of the
harness's ``modnorm-adam-split`` against the nominal masses, the heavy head and torch Adam.

    for w in 1024 256 32; do   # about 30 minutes on 2 cores
      python -m benchmarks.split_masses --width $w --seeds 0,1,2 --jobs 2; done
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.adam_gap import STEPS, Job, ablate, on_digits
from benchmarks.adam_split import Project
from modnorm import baselines, compounds
from modnorm import optim as mn_optim

MASSES: dict[str, tuple[float, float]] = {  # variant: (blocks_mass, head_mass)
    "nominal": (1.0, 1.0),
    "head 2^3": (1.0, 8.0),
    "torch's split at width 32": (2**-1, 2**-0.5),
    "torch's split at width 256": (2**1.5, 2**2),
    "torch's split at width 1024": (2**3.5, 2**4),
}
BOOST = " + early boost"
LRS = [-3, -2, -1, 0, 1, 2]
# The same task with its pixels mapped onto 256 features (adam_split.Project): the width rule
# of the harness's modnorm-adam-split (head width/d_in, blocks that over √2) against the
# nominal masses, the heavy head and torch Adam, where d_in is not 64.
D256 = " (pixels onto 256)"
RULE = "width rule"
TORCH = "torch Adam"
GRIDS: dict[str, list[int]] = {
    **{name: LRS for name in MASSES},
    **{name + BOOST: LRS for name in ("nominal", "torch's split at width 1024")},
    **{name + D256: LRS for name in ("nominal", "head 2^3", RULE)},
    TORCH + D256: list(range(-12, 0)),
}


def boost(opt: torch.optim.Optimizer, size: float = 4.0, steps: float = 5.0) -> None:
    """Multiply ``opt``'s lr at step ``t`` by ``1 + size·exp(−t/steps)`` (on top of its
    schedule): tuned torch Adam's step, in modnorm's units and against its schedule, starts
    about five times its later size and falls to it over some twenty steps (at widths 32
    and 1024 alike), where a normalized step keeps its size."""
    count = [0]
    saved: list[float] = []

    def pre(*_: Any) -> None:
        saved[:] = [g["lr"] for g in opt.param_groups]
        factor = 1 + size * math.exp(-count[0] / steps)
        for g in opt.param_groups:
            g["lr"] = g["lr"] * factor

    def post(*_: Any) -> None:
        for g, lr in zip(opt.param_groups, saved, strict=True):
            g["lr"] = lr
        count[0] += 1

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)


def _parse(name: str) -> tuple[int, str]:
    """A variant's input width and its name without the input and boost suffixes."""
    return 256 if name.endswith(D256) else 64, name.removesuffix(D256).removesuffix(BOOST)


def masses(name: str, width: int) -> tuple[float, float]:
    """The ``(blocks_mass, head_mass)`` of a modnorm variant at ``width``."""
    d_in, base = _parse(name)
    return MASSES[base] if base != RULE else (width / d_in / 2**0.5, width / d_in)


def run(job: Job) -> dict[str, Any]:
    name = job[0]
    d_in, base = _parse(name)

    def make(width: int, blocks: int, lr: float) -> tuple[Any, list[Any]]:
        net: torch.nn.Module
        if base == TORCH:
            net = baselines.torch_resmlp(d_in, 10, width, blocks)
            opt: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        else:
            b, h = masses(name, width)
            net = compounds.ResMLP(d_in, 10, width, blocks, blocks_mass=b, head_mass=h)
            opt = mn_optim.Adam(net, lr=lr)  # type: ignore[arg-type]
        if name.endswith(BOOST):
            boost(opt)
        return (net if d_in == 64 else torch.nn.Sequential(Project(d_in), net)), [opt]

    return on_digits(job, make)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        GRIDS,
        run,
        1024,
        Path(__file__).parent / "results" / "split_masses",
        lambda w, b, n: f"ResMLP width {w}, {b} blocks; train loss (last 10 % of {n})",
        STEPS,
    )


if __name__ == "__main__":
    main()
