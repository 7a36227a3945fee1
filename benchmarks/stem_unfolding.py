"""Does the stem's convolution train better per kernel position on colour images too (issue #6)?

On digits (one channel) modnorm-dual on the affine ResCNN trains best with the blocks'
convolutions unfolded (one ``(out, in·k²)`` matrix each, as Muon sees them) and the stem's
per kernel position (benchmarks/rescnn_gap.py): unfolding the stem too costs loss. There the
stem's kernel at one position is an ``(out, 1)`` column. This asks the same on three-channel
images, where it is an ``(out, 3)`` matrix: digits coloured like "coloured MNIST", each image
drawn in its own random bright ink on a dark background (the label is still the digit), the three
channels standardized with training statistics, fresh input noise each step.

Variants, each modnorm-dual (lr 2^k) on ``ResCNN(affine_mass=0.25)``'s network
(`rescnn_gap.affine_rescnn`): every convolution per kernel position, only the blocks'
unfolded, only the stem's, every one unfolded.

    python -m benchmarks.stem_unfolding --jobs 2 --seeds 0,1,2 --width 16
    python -m benchmarks.stem_unfolding --jobs 2 --seeds 0,1,2 --width 128
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from benchmarks.adam_gap import Job, ablate, train_row
from benchmarks.rescnn_gap import affine_rescnn
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim

STEPS, WIDTH = 200, 16
LRS = [-2, -1, 0, 1]
VARIANTS: dict[str, tuple[bool, bool]] = {  # (stem unfolded, blocks unfolded)
    "per position": (False, False),
    "blocks unfolded": (False, True),
    "stem unfolded": (True, False),
    "all unfolded": (True, True),
}


def coloured_digits(input_noise: float = 1.0, test_size: int = 297) -> mn_data.Dataset:
    """sklearn's digits as ``(N, 3, 8, 8)`` colour images: image ``i``'s pixel of intensity
    ``t ∈ [0, 1]`` is ``(1 − t)·background_i + t·ink_i``, a bright ink uniform in
    ``[0.5, 1]³`` on a dark background uniform in ``[0, 0.3]³`` (so every channel shows the
    digit, as a natural image's channels are alike; a fixed generator), split as
    `modnorm.data.digits` and standardized per channel and pixel with training statistics."""
    from sklearn.datasets import load_digits

    d = load_digits()
    t = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(4321)
    ink = 0.5 + 0.5 * torch.rand(len(t), 3, 1, 1, generator=g)
    background = 0.3 * torch.rand(len(t), 3, 1, 1, generator=g)
    x = (1 - t) * background + t * ink
    return mn_data._split_standardized("coloured digits", x, y, input_noise, test_size)


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    cfg = ex.SweepConfig(model="rescnn", steps=steps, input_noise=1.0, depth=blocks)

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = affine_rescnn(width, depth, VARIANTS[name], in_channels=3)
        return net, [mn_optim.Dual(net, lr=lr)]

    return train_row(job, cfg, coloured_digits(), build)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        dict.fromkeys(VARIANTS, LRS),
        run,
        WIDTH,
        Path(__file__).parent / "results" / "stem_unfolding",
        lambda w, b, n: f"width {w}, {b} blocks, coloured digits; train loss ({n} steps)",
        STEPS,
    )


if __name__ == "__main__":
    main()
