"""What a unit of each atom's share of a step buys, by width (issue #6: why a wide ResMLP
trains better with a heavier head).

A normalized step moves atom ``i`` by ``η·share_i`` in its own norm. To first order it lowers
the loss by ``Σ_i η·share_i·e_i`` with ``e_i = -⟨G_i, Δ_i⟩ / (η·share_i)``: what a unit of
atom ``i``'s share buys (at most the dual norm ``‖G_i‖*``, reached by the dual map). If the
head's ``e`` grows against the other atoms' with width, moving share to the head (a heavier
head) pays more at width, to first order. This trains the nominal ResMLP of
``benchmarks/logit_scale.py`` (200 steps of 128, digits with input noise, 2 blocks,
modnorm-adam at 2^-1, its best lr at every width) and records, every 10 steps, ``e`` of the
input layer, each block's Linear and the head (the step's own gradient and update), and, on
a fixed batch, what each atom's update alone predicts to first order and what it lowers:
their difference is the loss's curvature along it, which says how far a quadratic model
would step (benchmarks/RESULTS.md, "What a unit of the head's share buys").

    python -m benchmarks.head_share --jobs 2     # widths 32, 256, 1024, 3 seeds: ~1 min
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import logit_scale as ls
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim

OUT = Path(__file__).parent / "results" / "head_share"
EVERY = 10


def run(job: tuple[int, int]) -> dict[str, Any]:
    width, seed = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = ex.SweepConfig(steps=200, batch_size=128, input_noise=1.0, depth=2)
    data = mn_data.load("digits", input_noise=1.0)
    records: list[dict[str, Any]] = []

    class Recording(mn_optim.Adam):
        """modnorm's Adam that records ``e`` of every atom every ``EVERY`` steps."""

        taken = 0

        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            self.taken += 1
            if self.taken % EVERY:
                return super().step(closure)
            shares = self.module.atom_shares()
            before = [[p.detach().clone() for p in a.parameters()] for a, _ in shares]
            grads = [[p.grad.detach().clone() for p in a.parameters()] for a, _ in shares]
            out = super().step(closure)
            eta = self.param_groups[0]["lr"]
            gain = []
            for (atom, _), b, g in zip(shares, before, grads, strict=True):
                moved = sum(float((gi * (p.detach() - bi)).sum()) for p, bi, gi in
                            zip(atom.parameters(), b, g, strict=True))  # fmt: skip
                gain.append(-moved)
            e = [gi / (eta * share) for gi, (_, share) in zip(gain, shares, strict=True)]
            records.append(
                {"step": self.taken, "e": e, "gain": gain, **realized(self.module, before)}
            )
            return out

    x, y = data.batch(512, torch.Generator().manual_seed(123), cfg.context)

    @torch.no_grad()
    def set_(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
        for p, v in zip(params, values, strict=True):
            p.copy_(v)

    def realized(net: Any, before: list[list[torch.Tensor]]) -> dict[str, list[float]]:
        """On a fixed batch of 512: each atom's step alone, the loss it predicts to first order
        (``-⟨G, Δ_i⟩``, ``G`` the batch's gradient before the step) and the loss it lowers."""
        atoms = [list(a.parameters()) for a, _ in net.atom_shares()]
        after = [[p.detach().clone() for p in ps] for ps in atoms]
        for ps, b in zip(atoms, before, strict=True):
            set_(ps, b)
        flat = [p for ps in atoms for p in ps]
        loss = ex.loss_fn(net(x), y)
        grads = iter(torch.autograd.grad(loss, flat))
        predicted, lowered = [], []
        with torch.no_grad():
            for ps, b, a in zip(atoms, before, after, strict=True):
                g = [next(grads) for _ in ps]
                steps = zip(g, a, b, strict=True)
                predicted.append(-sum(float((gi * (ai - bi)).sum()) for gi, ai, bi in steps))
                set_(ps, a)
                lowered.append(float(loss - ex.loss_fn(net(x), y)))
                set_(ps, b)
        for ps, a in zip(atoms, after, strict=True):
            set_(ps, a)
        return {"predicted": predicted, "lowered": lowered}

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = ls.network("nominal", width, depth)
        return net, [Recording(net, lr=lr)]

    r = ex.train_one(cfg, data, "modnorm-adam", width, 2, 0.5, seed, build=build)
    return {"width": width, "seed": seed, "train_loss": r["train_loss"], "records": records}


WINDOWS = ((10, 50), (60, 120), (130, 200))  # early, middle, late: steps averaged over


def report(rows: list[dict[str, Any]]) -> str:
    """Per width, means over seeds and over the records in each window of steps: ``e`` of the
    head, of the input layer and of the blocks' Linears (the mean of them), and the head's
    over the others'."""
    out = [
        "| width | train loss | e: head (early, middle, late) | e: input layer | e: blocks "
        "| head / blocks | head / input layer | optimum / step: head | input layer | blocks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for width in sorted({r["width"] for r in rows}):
        mine = [r for r in rows if r["width"] == width]

        def at(window: tuple[int, int], part: str, runs: list[dict[str, Any]] = mine) -> float:
            vals = []
            for r in runs:
                for rec in r["records"]:
                    if window[0] <= rec["step"] <= window[1]:
                        e = rec["e"]  # atoms in tree order: input layer, blocks, head
                        parts = {"input": e[0], "blocks": statistics.fmean(e[1:-1]), "head": e[-1]}
                        vals.append(parts[part])
            return statistics.fmean(vals)

        def cells(f: Any) -> str:
            return ", ".join(f"{f(w):.3g}" for w in WINDOWS)

        def optimum(window: tuple[int, int], part: str, runs: list[dict[str, Any]] = mine) -> float:
            """The step that a quadratic model of the loss along the atom's step would take,
            over the step taken, on the fixed batch: ``predicted / (2·(predicted - lowered))``
            (the first-order gain over twice the second-order term ``½ Δ_iᵀ H Δ_i``), each
            summed over the window's records. (The step's own batch would overstate the gain:
            the update follows that batch's noise.)"""
            pick = {"input": slice(0, 1), "blocks": slice(1, -1), "head": slice(-1, None)}[part]
            lo, hi = window
            recs = [rec for r in runs for rec in r["records"] if lo <= rec["step"] <= hi]
            gain = sum(sum(rec["predicted"][pick]) for rec in recs)
            lowered = sum(sum(rec["lowered"][pick]) for rec in recs)
            curvature = gain - lowered
            return gain / (2 * curvature)

        loss = statistics.fmean(r["train_loss"] for r in mine)
        out.append(
            f"| {width} | {loss:.3f} | {cells(lambda w: at(w, 'head'))} "
            f"| {cells(lambda w: at(w, 'input'))} | {cells(lambda w: at(w, 'blocks'))} "
            f"| {cells(lambda w: at(w, 'head') / at(w, 'blocks'))} "
            f"| {cells(lambda w: at(w, 'head') / at(w, 'input'))} "
            f"| {cells(lambda w: optimum(w, 'head'))} | {cells(lambda w: optimum(w, 'input'))} "
            f"| {cells(lambda w: optimum(w, 'blocks'))} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,256,1024")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the saved results' table")
    args = parser.parse_args()
    path = args.out / "results.json"
    if args.table:
        print(report(json.loads(path.read_text())["rows"]))
        return
    jobs = [(int(w), s) for w in args.widths.split(",") for s in range(args.seeds)]
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run, jobs, chunksize=1)
    ex.write_json_atomic(path, {"torch": torch.__version__, "rows": rows})
    print(report(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
