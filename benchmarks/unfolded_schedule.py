"""Does the unfolded ResCNN's lr drift with width depend on the lr schedule (issue #6)?

`benchmarks/lr_phases.py` finds the drift of modnorm-dual on the ResCNN with unfolded block
convolutions (best lr 2^0 at width 16, 2^-1 at 128) to be a mid-training stall: at width
128 the larger lr leads early, falls behind in steps 80–120 (the linear decay still at
60–40 % of the peak) and stays behind. If the stall is the lr being too large in the middle
of training, a schedule that is lower there should let the wide network keep the larger
peak lr, and one that is higher there should move it further down. This trains
``ResCNN(1, 10, width, 2, affine_mass=0.25, unfolded=True)`` under modnorm-dual (the
published grid's ``modnorm-dual-unfolded``: digits as 8 × 8 images with fresh input noise,
200 steps of 128) with the peak lr 2^k scaled at step ``s`` of ``T`` by

* ``linear``: ``1 − s/T``, the harness's own schedule (the published runs, bit for bit);
* ``quadratic``: ``(1 − s/T)²``, lower in the middle (0.36 of the peak at 40 %);
* ``power 1.5``: ``(1 − s/T)^1.5``, between the two (0.46 of the peak at 40 %);
* ``cosine``: ``(1 + cos(π s/T)) / 2``, higher in the first half.

    python -m benchmarks.unfolded_schedule --jobs 2 --seeds 0,1,2 --width 16
    python -m benchmarks.unfolded_schedule --jobs 2 --seeds 0,1,2 --width 128
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.adam_gap import Job, ablate, train_row
from modnorm import compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim

STEPS, WIDTH = 200, 16
LRS = [-2, -1, 0, 1]
SCHEDULES: dict[str, Callable[[float], float]] = {  # the lr's factor at a fraction t of training
    "linear": lambda t: 1 - t,
    "quadratic": lambda t: (1 - t) ** 2,
    "power 1.5": lambda t: (1 - t) ** 1.5,
    "cosine": lambda t: (1 + math.cos(math.pi * t)) / 2,
}


def scheduled(opt: torch.optim.Optimizer, factor: Callable[[float], float], steps: int) -> None:
    """Set ``opt``'s lr before each of its steps to its lr now times ``factor(step / steps)``:
    with the harness's ``constant`` schedule this is the whole schedule."""
    peaks = [group["lr"] for group in opt.param_groups]
    count = [0]

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, peak in zip(opt.param_groups, peaks, strict=True):
            group["lr"] = peak * factor(count[0] / steps)
        count[0] += 1

    opt.register_step_pre_hook(hook)


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    cfg = ex.SweepConfig(
        model="rescnn", steps=steps, input_noise=1.0, depth=blocks, schedule="constant"
    )
    data = mn_data.load("digits", image=True, input_noise=1.0)

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = compounds.ResCNN(1, 10, width, depth, affine_mass=0.25, unfolded=True)
        opt = mn_optim.Dual(net, lr=lr)
        scheduled(opt, SCHEDULES[name], steps)
        return net, [opt]

    return train_row(job, cfg, data, build)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        dict.fromkeys(SCHEDULES, LRS),
        run,
        WIDTH,
        Path(__file__).parent / "results" / "unfolded_schedule",
        lambda w, b, n: (
            f"modnorm-dual, unfolded blocks, width {w}, {b} blocks; train loss ({n} steps)"
        ),
        STEPS,
    )


if __name__ == "__main__":
    main()
