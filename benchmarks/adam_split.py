"""How tuned torch Adam splits its step among a ResMLP's layers, in modnorm's units (issue #6).

A normalized step of size ``lr`` gives each atom ``i`` of a modnorm network the norm
``lr·share_i`` (``Module.atom_shares``: fixed by the masses). torch Adam has no such split;
this measures the one it takes. It trains the ``torch.nn`` ResMLP of the transfer benchmark
(digits with fresh input noise, 2 blocks, 200 steps of 128, linear decay) under
``torch.optim.Adam`` at its best lr per width (`benchmarks/feature_learning.py`: 2^-5, 2^-8,
2^-10 at widths 32, 256, 1024), and every 5th step records each Linear's update in the norm
of the modnorm atom that computes the same map: ``‖ΔW‖₂·√(in/out)`` (modnorm's Linear is
``√(out/in)·W``). The fractions of their sum are set beside modnorm's shares, and the masses
``(blocks_mass, head_mass)`` of ``compounds.ResMLP`` whose shares come closest. With
``--d-in N`` a fixed orthogonal map first takes the 64 pixels to N features (the same task
with another input width; the lrs stay digits').

    python -m benchmarks.adam_split --seeds 0,1,2 --jobs 2    # about 3 minutes on 2 cores
    python -m benchmarks.adam_split --table                   # the tables, from the saved JSON
    python -m benchmarks.adam_split --seeds 0,1,2 --jobs 2 --d-in 256    # and --d-in 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modnorm import atoms, baselines, compounds
from modnorm import data as mn_data
from modnorm import experiments as ex

OUT = Path(__file__).parent / "results" / "adam_split"
BEST_LOG2_LR = {32: -5, 256: -8, 1024: -10}  # torch Adam's, benchmarks/feature_learning.py
EVERY = 5
LAYERS = ["input", "block 1", "block 2", "head"]


def linears(net: nn.Module) -> list[nn.Module]:
    """The network's matrices in forward order: torch's ``nn.Linear`` or modnorm's atoms."""
    found = [m for m in net.modules() if isinstance(m, (nn.Linear, atoms.Linear))]
    if isinstance(net, nn.Sequential):
        return found  # torch_resmlp: input layer, blocks, head in module order
    return [a for a, _ in net.atom_shares()]  # type: ignore[operator]


def atom_norm(layer: nn.Module, delta: torch.Tensor) -> float:
    """The norm of a change ``delta`` of ``layer``'s weight, in the modnorm atom that
    computes the same map: ``√(out/in)·W`` for modnorm's Linear, ``W`` for torch's."""
    out, inp = delta.shape
    size = float(torch.linalg.matrix_norm(delta.double(), ord=2))
    return size if isinstance(layer, atoms.Linear) else size * math.sqrt(inp / out)


def split(net: nn.Module, opt: torch.optim.Optimizer, every: int = EVERY) -> list[list[float]]:
    """Hook ``opt`` so that every ``every``-th step appends each layer's update size (in
    `atom_norm`) to the returned list."""
    return record_sizes(linears(net), atom_norm, [opt], every)


def record_sizes(
    layers: list[nn.Module],
    norm: Callable[[Any, torch.Tensor], float],
    opts: list[torch.optim.Optimizer],
    every: int = EVERY,
) -> list[list[float]]:
    """Hook ``opts`` (stepped in this order, as one step) so that every ``every``-th step
    appends ``norm(layer, change of its weight)`` for each layer to the returned list."""
    steps: list[list[float]] = []
    before: list[torch.Tensor] = []
    count = [0]

    def pre(*_: Any) -> None:
        if count[0] % every == 0:
            before[:] = [m.weight.detach().clone() for m in layers]  # type: ignore[union-attr]

    def post(*_: Any) -> None:
        if count[0] % every == 0:
            deltas = [m.weight.detach() - b for m, b in zip(layers, before, strict=True)]  # type: ignore[union-attr]
            steps.append([norm(m, d) for m, d in zip(layers, deltas, strict=True)])
        count[0] += 1

    opts[0].register_step_pre_hook(pre)
    opts[-1].register_step_post_hook(post)
    return steps


class Project(nn.Module):
    """A fixed map of the 64 pixels onto ``d_in`` features (orthonormal rows or columns,
    scaled to keep the features' RMS), so that the same task has another input width."""

    def __init__(self, d_in: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(99)  # not the global RNG: the init stays the same
        q, _ = torch.linalg.qr(torch.randn(max(64, d_in), min(64, d_in), generator=gen))
        p = q if d_in <= 64 else q.T
        self.register_buffer("p", p * math.sqrt(d_in / 64) if d_in > 64 else p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.p


def run(job: tuple[int, int, int]) -> dict[str, Any]:
    width, seed, d_in = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = ex.SweepConfig(steps=200, batch_size=128, input_noise=1.0, depth=2)
    data = mn_data.load("digits", input_noise=1.0)
    recorded: list[list[list[float]]] = []

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = baselines.torch_resmlp(d_in, 10, width, depth)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        recorded.append(split(net, opt))
        return (net if d_in == 64 else nn.Sequential(Project(d_in), net)), [opt]

    lr = 2.0 ** BEST_LOG2_LR[width]
    r = ex.train_one(cfg, data, "torch-adam", width, 2, lr, seed, build=build)
    return {"width": width, "seed": seed, "d_in": d_in, "log2_lr": BEST_LOG2_LR[width],
            "train_loss": r["train_loss"], "sizes": recorded[0]}  # fmt: skip


def fractions(sizes: list[list[float]]) -> list[float]:
    """Each layer's mean fraction of the summed sizes over the recorded steps."""
    per_step = [[s / sum(step) for s in step] for step in sizes]
    return [statistics.fmean(col) for col in zip(*per_step, strict=True)]


def shares(blocks_mass: float, head_mass: float) -> list[float]:
    """modnorm's shares in the ResMLP, as fractions of their sum (comparable to `fractions`);
    they do not depend on the width, so a narrow one is built."""
    net = compounds.ResMLP(64, 10, 8, 2, blocks_mass=blocks_mass, head_mass=head_mass)
    s = [share for _, share in net.atom_shares()]
    return [x / sum(s) for x in s]


def closest_masses(target: list[float]) -> tuple[float, float]:
    """The ``(blocks_mass, head_mass)`` on a half-octave grid whose shares are closest to
    ``target`` in log ratio (the input layer's mass is 1)."""
    grid = [2.0 ** (k / 2) for k in range(-12, 21)]

    def miss(masses: tuple[float, float]) -> float:
        got = shares(*masses)
        return sum(math.log(g / t) ** 2 for g, t in zip(got, target, strict=True))

    return min(itertools.product(grid, grid), key=miss)


def profile(sizes: list[list[float]], steps: int = 200, every: int = EVERY) -> list[float]:
    """The summed size of each recorded step divided by the linear schedule's factor there."""
    return [sum(step) / (1 - every * i / steps) for i, step in enumerate(sizes)]


PROFILE_STEPS = [0, 5, 10, 15, 20, 25, 50, 100, 150, 195]


def report(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print the split per width (and modnorm's at two sets of masses) and how the step's
    size moves against the schedule; return the summary."""
    widths = sorted({r["width"] for r in rows})
    print("torch Adam's step split among the layers (fraction of the summed atom norms, mean "
          "over seeds and every 5th step), against modnorm's shares\n")  # fmt: skip
    print(f"| width | lr | loss | {' | '.join(LAYERS)} | closest (blocks, head) masses |")
    print("|---|---|---|" + "---|" * len(LAYERS) + "---|")
    summary = []
    for w in widths:
        mine = [r for r in rows if r["width"] == w]
        per_seed = [fractions(r["sizes"]) for r in mine]
        frac = [statistics.fmean(c) for c in zip(*per_seed, strict=True)]
        masses = closest_masses(frac)
        loss = statistics.fmean(r["train_loss"] for r in mine)
        cells = " | ".join(f"{f:.3f}" for f in frac)
        closest = f"{masses[0]:g}, {masses[1]:g}"
        print(f"| {w} | 2^{BEST_LOG2_LR[w]} | {loss:.3f} | {cells} | {closest} |")
        summary.append({"width": w, "fractions": frac, "closest_masses": masses})
    for masses in [(1.0, 1.0), (1.0, 8.0)]:
        cells = " | ".join(f"{f:.3f}" for f in shares(*masses))
        print(f"| modnorm, masses {masses[0]:g}, {masses[1]:g} | | | {cells} | |")
    print("\nThe summed step size over the schedule's factor (1 − t/200), mean over seeds; a "
          "normalized step keeps it at lr·Σ shares\n")  # fmt: skip
    print("| width | " + " | ".join(f"step {t}" for t in PROFILE_STEPS) + " |")
    print("|---|" + "---|" * len(PROFILE_STEPS))
    for w in widths:
        curves = [profile(r["sizes"]) for r in rows if r["width"] == w]
        mean = [statistics.fmean(c[t // EVERY] for c in curves) for t in PROFILE_STEPS]
        print(f"| {w} | " + " | ".join(f"{m:.3f}" for m in mean) + " |")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,256,1024")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--d-in", type=int, default=64, help="project the 64 pixels onto this many features"
    )
    parser.add_argument("--table", action="store_true", help="print the tables of the saved JSON")
    args = parser.parse_args()
    path = args.out / ("split.json" if args.d_in == 64 else f"split_d{args.d_in}.json")
    if args.table:
        report(json.loads(path.read_text())["rows"])
        return
    widths = [int(w) for w in args.widths.split(",")]
    unknown = [w for w in widths if w not in BEST_LOG2_LR]
    if unknown:
        parser.error(f"no best lr measured for width(s) {unknown}: {sorted(BEST_LOG2_LR)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run, [(w, s, args.d_in) for w in widths for s in seeds], chunksize=1)
    summary = report(rows)
    ex.write_json_atomic(path, {"torch": torch.__version__, "summary": summary, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
