"""Why the ResCNN's best learning rate moves with depth (issue #6).

On the `models` suite's ResCNN depth sweep (digits as 8 × 8 images with fresh input noise,
width 16, 200 steps of 128, linear decay) every modular method's best lr moves one octave
up from 2 to 16 blocks, where on the ResMLP (width 64, 2 to 32 blocks) it stays. This trains
modnorm-adam at one depth (``--blocks``, run it at 2 and at 16) under variants that each
change one thing of the ResCNN, and the ResMLP on the flattened images as the control;
compare each variant's best lr at the two depths:

    python -m benchmarks.rescnn_depth --blocks 2 --jobs 2 --seeds 0,1,2
    python -m benchmarks.rescnn_depth --blocks 16 --jobs 2 --seeds 0,1,2
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.adam_gap import Job, ablate, train_row
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.atoms import Conv2d, Linear
from modnorm.bonds import AvgPool, Flatten, MeanSubtract, RMSDivide
from modnorm.compounds import ResMLP, _activation, _residual
from modnorm.modules import Module

STEPS, WIDTH = 200, 16  # the `models` suite's ResCNN depth sweep
LRS = [-2, -1, 0, 1, 2, 3, 4, 5]


def rescnn(
    width: int,
    blocks: int,
    kernel: int = 3,
    blocks_mass: float = 20.0,
    dims: tuple[int, ...] = (1, 2, 3),
    pool: bool = True,
) -> Module:
    """`compounds.ResCNN` on 1-channel 8 × 8 images (the defaults), with the kernel size, the
    blocks' mass, the dimensions its RMSDivide and MeanSubtract normalize over, or the
    pooling before the head changed."""
    initial = Conv2d(1, width, kernel)
    conv = Conv2d(width, width, kernel)
    residue = MeanSubtract(dims) @ _activation("abs") @ conv @ RMSDivide(dims)
    stack = _residual(residue, blocks, 1 / blocks) ** blocks
    stack.tare(blocks_mass)
    if pool:
        return Linear(width, 10) @ Flatten() @ AvgPool() @ stack @ initial
    return Linear(width * 64, 10) @ Flatten() @ stack @ initial


Variant = tuple[Callable[[int, int], Module], bool]  # the network, and whether it sees images

VARIANTS: dict[str, Variant] = {
    "ResCNN": (rescnn, True),
    "ResCNN with kernel 1": (lambda w, b: rescnn(w, b, kernel=1), True),
    "ResCNN with blocks mass 1": (lambda w, b: rescnn(w, b, blocks_mass=1.0), True),
    "ResCNN normalized per pixel": (lambda w, b: rescnn(w, b, dims=(1,)), True),
    "ResCNN without pooling": (lambda w, b: rescnn(w, b, pool=False), True),
    "ResMLP on the flattened images": (lambda w, b: ResMLP(64, 10, w, b), False),
    "ResMLP with blocks mass 20": (lambda w, b: ResMLP(64, 10, w, b, blocks_mass=20.0), False),
}


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    make_net, image = VARIANTS[name]
    cfg = ex.SweepConfig(
        model="rescnn" if image else "resmlp", steps=steps, input_noise=1.0, depth=blocks
    )
    data = mn_data.load("digits", image=image, input_noise=1.0)

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = make_net(width, depth)
        return net, [mn_optim.Adam(net, lr=lr)]

    return train_row(job, cfg, data, build)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        dict.fromkeys(VARIANTS, LRS),
        run,
        WIDTH,
        Path(__file__).parent / "results" / "rescnn_depth",
        lambda w, b, n: f"modnorm-adam, width {w}, {b} blocks, digits; train loss ({n} steps)",
        STEPS,
    )


if __name__ == "__main__":
    main()
