"""How Muon splits its step among the affine ResCNN's atoms, in modnorm's units (issue #6).

On the 2-block ResCNN at width 128 (digits as 8 × 8 images with fresh input noise, 200
steps of 128, linear decay) Muon's step on modnorm's own network (`rescnn_gap`'s "muon on
modnorm's ResCNN (affine_mass 0.25)": ``torch.optim.Muon`` on the hidden convolutions, AdamW
on the rest, made in the effective weights) reaches a lower loss than modnorm-adam and
modnorm-dual on the same network. The network is the same, so the step is what differs. A
normalized step of size ``lr`` gives each atom the norm ``lr·share`` (`Module.atom_shares`,
fixed by the masses); this records, every 5th step, the norm of each atom's update under
each optimizer at its best lr, and sets the fractions of their sum beside modnorm's shares
and beside the masses ``(blocks_mass, head_mass, affine_mass)`` of `compounds.ResCNN` whose
shares come closest.

    python -m benchmarks.muon_split --jobs 2 --seeds 0,1,2   # about 12 minutes on 2 cores
    python -m benchmarks.muon_split --table                  # the tables, from the saved JSON
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import rescnn_gap
from benchmarks.adam_split import EVERY, fractions, record_sizes
from modnorm import compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.atoms import Bias, Conv2d, Gain, Linear
from modnorm.modules import Atom, Module

OUT = Path(__file__).parent / "results" / "muon_split"
AFFINE_MASS = 0.25
# Each optimizer's best lr on the affine ResCNN (rescnn_gap at 200 steps, benchmarks/RESULTS.md)
BEST_LOG2_LR = {
    ("muon", 16): -3,
    ("muon", 128): -6,
    ("modnorm-adam", 16): 1,
    ("modnorm-adam", 128): 1,
    ("modnorm-dual", 16): 0,
    ("modnorm-dual", 128): 0,
}
ROLES = ["stem", "stem bias", "norm gains", "norm biases", "block convs", "conv biases",
         "head", "head bias"]  # fmt: skip


def optimizers(method: str, net: Module, lr: float) -> list[torch.optim.Optimizer]:
    if method == "muon":
        return rescnn_gap._muon_on_modnorm(net, lr)
    if method == "modnorm-adam":
        return [mn_optim.Adam(net, lr=lr)]
    if method == "modnorm-dual":
        return [mn_optim.Dual(net, lr=lr)]
    raise ValueError(f"unknown method {method!r}: choose from muon, modnorm-adam, modnorm-dual")


def roles(atoms: list[Atom]) -> list[str]:
    """Each atom's part of the ResCNN, from its type and the atom before it (parameter
    order is the order of application)."""
    names = []
    for i, a in enumerate(atoms):
        prev = atoms[i - 1] if i else None
        if isinstance(a, Conv2d):
            names.append("stem" if i == 0 else "block convs")
        elif isinstance(a, Linear):
            names.append("head")
        elif isinstance(a, Gain):
            names.append("norm gains")
        elif isinstance(a, Bias) and isinstance(prev, Gain):
            names.append("norm biases")
        elif isinstance(a, Bias) and isinstance(prev, Linear):
            names.append("head bias")
        elif isinstance(a, Bias) and i == 1:
            names.append("stem bias")
        elif isinstance(a, Bias):
            names.append("conv biases")
        else:
            raise ValueError(f"atom {i} ({type(a).__name__}) has no role in the ResCNN")
    return names


def record(net: Module, opts: list[torch.optim.Optimizer]) -> list[list[float]]:
    """Hook ``opts`` (stepped in order) so that every `EVERY`-th step appends each atom's
    update norm (its own ``atom_norm``) to the returned list."""
    # atom_norm also moves the atoms' spectral-norm warm starts; normalize converges from any
    # start, so the sizes it sets move only within its tolerance (the losses equal
    # rescnn_gap's runs without the hooks)
    atoms = [a for a, _ in net.atom_shares()]
    return record_sizes(atoms, lambda a, d: float(a.atom_norm(d)), opts, EVERY)


def run(job: tuple[str, int, int]) -> dict[str, Any]:
    method, width, seed = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = ex.SweepConfig(model="rescnn", steps=200, input_noise=1.0, depth=2)
    data = mn_data.load("digits", image=True, input_noise=1.0)
    recorded: list[list[list[float]]] = []

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = compounds.ResCNN(1, 10, width, depth, affine_mass=AFFINE_MASS)
        opts = optimizers(method, net, lr)
        recorded.append(record(net, opts))
        return net, opts

    k = BEST_LOG2_LR[method, width]
    r = ex.train_one(cfg, data, "modnorm-adam", width, 2, 2.0**k, seed, build=build)
    return {"method": method, "width": width, "seed": seed, "log2_lr": k,
            "train_loss": r["train_loss"], "sizes": recorded[0]}  # fmt: skip


def by_role(per_atom: list[float], names: list[str]) -> list[float]:
    """The per-atom values summed over each role of `ROLES`."""
    return [sum(v for v, n in zip(per_atom, names, strict=True) if n == r) for r in ROLES]


def shares(masses: tuple[float, float, float]) -> list[float]:
    """modnorm's shares of the affine ResCNN with ``(blocks_mass, head_mass, affine_mass)``,
    as fractions of their sum, per atom (they do not depend on the width)."""
    b, h, a = masses
    net = compounds.ResCNN(1, 10, 4, 2, blocks_mass=b, head_mass=h, affine_mass=a)
    s = [share for _, share in net.atom_shares()]
    return [x / sum(s) for x in s]


def closest_masses(target: list[float]) -> tuple[float, float, float]:
    """The masses on an octave grid (blocks 1 … 256, head 1/16 … 16, affine 1/64 … 4)
    whose per-atom shares are closest to ``target`` in log ratio (the stem's mass is 1)."""
    blocks, head, affine = ([2.0**k for k in range(lo, lo + 9)] for lo in (0, -4, -6))

    def miss(masses: tuple[float, float, float]) -> float:
        got = shares(masses)
        return sum(math.log(g / t) ** 2 for g, t in zip(got, target, strict=True))

    return min(itertools.product(blocks, head, affine), key=miss)


def report(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Print each method's split per width by role, against modnorm's shares; return it."""
    names = roles([a for a, _ in compounds.ResCNN(1, 10, 4, 2, affine_mass=1).atom_shares()])
    print("Each optimizer's step split among the affine ResCNN's atoms (fraction of the summed "
          "atom norms, mean over seeds and every 5th step), by role\n")  # fmt: skip
    print(f"| method | width | lr | loss | {' | '.join(ROLES)} | closest masses |")
    print("|---|---|---|---|" + "---|" * len(ROLES) + "---|")
    summary = []
    for method, width in sorted({(r["method"], r["width"]) for r in rows}):
        mine = [r for r in rows if r["method"] == method and r["width"] == width]
        per_seed = [fractions(r["sizes"]) for r in mine]
        frac = [statistics.fmean(c) for c in zip(*per_seed, strict=True)]
        masses = closest_masses(frac)
        loss = statistics.fmean(r["train_loss"] for r in mine)
        cells = " | ".join(f"{f:.3f}" for f in by_role(frac, names))
        closest = ", ".join(f"{m:g}" for m in masses)
        print(f"| {method} | {width} | 2^{mine[0]['log2_lr']} | {loss:.3f} | {cells} | {closest} |")
        summary.append({"method": method, "width": width, "fractions": frac,
                        "closest_masses": masses})  # fmt: skip
    cells = " | ".join(f"{f:.3f}" for f in by_role(shares((20.0, 1.0, AFFINE_MASS)), names))
    print(f"| modnorm's shares (20, 1, {AFFINE_MASS:g}) | | | | {cells} | |")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,128")
    parser.add_argument("--methods", default="muon,modnorm-adam,modnorm-dual")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the tables of the saved JSON")
    args = parser.parse_args()
    path = args.out / "split.json"
    if args.table:
        report(json.loads(path.read_text())["rows"])
        return
    jobs = [(m.strip(), int(w), int(s)) for m in args.methods.split(",")
            for w in args.widths.split(",") for s in args.seeds.split(",")]  # fmt: skip
    missing = sorted({(m, w) for m, w, _ in jobs} - set(BEST_LOG2_LR))
    if missing:
        parser.error(f"no best lr measured for {missing}: {sorted(BEST_LOG2_LR)}")
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run, jobs, chunksize=1)
    summary = report(rows)
    ex.write_json_atomic(path, {"torch": torch.__version__, "summary": summary, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
