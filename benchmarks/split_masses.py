"""modnorm-adam with the masses that give torch Adam's split of a step among the layers
(issue #6; the split is measured by ``benchmarks/adam_split.py``).

Tuned torch Adam gives the ResMLP's input layer a fraction of its step that falls with
width (0.36, 0.09, 0.03 at widths 32, 256, 1024) and the blocks and head the rest; the
``compounds.ResMLP`` masses ``(blocks_mass, head_mass)`` closest to it are (2^-1, 2^-0.5),
(2^1.5, 2^2) and (2^3.5, 2^4). This trains modnorm-adam with each, and with the nominal
masses and the heavy head of `benchmarks/feature_learning.py`, at one width (the transfer
benchmark's setting: digits with fresh input noise, 2 blocks, 200 steps of 128).

    for w in 1024 256 32; do   # about 15 minutes on 2 cores
      python -m benchmarks.split_masses --width $w --seeds 0,1,2 --jobs 2; done
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.adam_gap import STEPS, Job, ablate, train_row
from modnorm import compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim

MASSES: dict[str, tuple[float, float]] = {  # variant: (blocks_mass, head_mass)
    "nominal": (1.0, 1.0),
    "head 2^3": (1.0, 8.0),
    "torch's split at width 32": (2**-1, 2**-0.5),
    "torch's split at width 256": (2**1.5, 2**2),
    "torch's split at width 1024": (2**3.5, 2**4),
}
LRS = [-2, -1, 0, 1, 2]


def run(job: Job) -> dict[str, Any]:
    name, _, blocks, _, steps, _ = job
    cfg = ex.SweepConfig(steps=steps, batch_size=128, input_noise=1.0, depth=blocks)
    data = mn_data.load("digits", input_noise=1.0)
    blocks_mass, head_mass = MASSES[name]

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = compounds.ResMLP(64, 10, width, depth, blocks_mass=blocks_mass, head_mass=head_mass)
        return net, [mn_optim.Adam(net, lr=lr)]

    return train_row(job, cfg, data, build)


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        {name: LRS for name in MASSES},
        run,
        1024,
        Path(__file__).parent / "results" / "split_masses",
        lambda w, b, n: f"ResMLP width {w}, {b} blocks; train loss (last 10 % of {n})",
        STEPS,
    )


if __name__ == "__main__":
    main()
