"""Where modnorm-adam's loss gap to tuned Adam at width 1024 comes from (issue #6).

On the transfer benchmark's ResMLP width sweep (digits with fresh input noise, 200 steps of
128, linear decay, seed 0) modnorm-adam reaches a training loss of 0.211 at width 1024 and
torch Adam, tuned at that width on the plain ``torch.nn`` model, 0.184. This trains one
width under variants that each change one thing, on a small lr grid around each one's best:

* the optimizer: ``torch.optim.Adam`` (not normalized) on modnorm's own ResMLP; Adam's
  ``β₁``, ``β₂``; more mass on the residual blocks;
* the network: logits scaled by 4 or 16; a normalization before the head; the blocks in
  LayerNorm's order (``act ∘ Linear ∘ RMSDivide ∘ MeanSubtract``); plain residuals
  ``x + block(x)``, or ``x + block(x)/L``, instead of ``(1 − 1/L)·x + (1/L)·block(x)``.

    python benchmarks/adam_gap.py --jobs 2               # about 10 minutes on 2 cores
    python benchmarks/adam_gap.py --width 32 --jobs 2    # the same at width 32
    python benchmarks/adam_gap.py --width 64 --blocks 32 --jobs 2   # and at depth 32
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modnorm import compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.atoms import Linear
from modnorm.bonds import Flatten, Identity, MeanSubtract, RMSDivide
from modnorm.compounds import ResMLP
from modnorm.modules import Module

MODNORM_LRS = [-2, -1, 0]
TORCH_LRS = [-10, -9, -8, -7, -6]


def resmlp(width: int, blocks: int, order: str = "post", residual: str = "convex",
           final_norm: bool = False) -> Module:  # fmt: skip
    """modnorm's ResMLP (the defaults: `compounds.ResMLP`, its weights drawn in the same
    order) with a part changed that `compounds.ResMLP` has no option for."""
    initial = Linear(64, width) @ Flatten()
    act = compounds._activation("abs")
    if order == "post":  # modnorm's: normalize, Linear, activation, subtract the mean
        residue = MeanSubtract() @ act @ Linear(width, width) @ RMSDivide()
    else:  # LayerNorm's order: subtract the mean, normalize, Linear, activation
        residue = act @ Linear(width, width) @ RMSDivide() @ MeanSubtract()
    if residual == "convex":  # (1 − 1/L)·x + (1/L)·block(x)
        stack = compounds._residual(residue, blocks, 1 / blocks) ** blocks
    elif residual == "scaled":  # x + block(x)/L: the stream grows at most (1 + 1/L)^L < e
        stack = (Identity() + (1 / blocks) * residue) ** blocks
    else:  # x + block(x)
        stack = (Identity() + residue) ** blocks
    stack.tare(1.0)
    head: Module = Linear(width, 10)
    if final_norm:
        head = head @ RMSDivide() @ MeanSubtract()
    return head @ stack @ initial


Variant = tuple[Callable[[int, int], Module], Callable[[Module, float], Any], list[int]]


def _adam(**kw: Any) -> Callable[[Module, float], Any]:
    return lambda m, lr: mn_optim.Adam(m, lr=lr, **kw)


VARIANTS: dict[str, Variant] = {
    "modnorm-adam": (resmlp, _adam(), MODNORM_LRS),
    "torch Adam on modnorm's ResMLP": (
        resmlp,
        lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr),
        TORCH_LRS,
    ),
    "beta1 0.95": (resmlp, _adam(betas=(0.95, 0.99)), MODNORM_LRS),
    "beta2 0.999": (resmlp, _adam(betas=(0.9, 0.999)), MODNORM_LRS),
    "blocks mass 4": (lambda w, b: ResMLP(64, 10, w, b, blocks_mass=4.0), _adam(), MODNORM_LRS),
    "blocks mass 16": (lambda w, b: ResMLP(64, 10, w, b, blocks_mass=16.0), _adam(), MODNORM_LRS),
    "logits x4": (lambda w, b: ResMLP(64, 10, w, b, output_scale=4.0), _adam(), [-2, -1, 0, 1]),
    "logits x16": (lambda w, b: ResMLP(64, 10, w, b, output_scale=16.0), _adam(), [-2, -1, 0, 1]),
    "norm before the head": (lambda w, b: resmlp(w, b, final_norm=True), _adam(), MODNORM_LRS),
    "LayerNorm's order": (lambda w, b: resmlp(w, b, order="pre"), _adam(), MODNORM_LRS),
    "plain residuals": (lambda w, b: resmlp(w, b, residual="plain"), _adam(), MODNORM_LRS),
    "residuals x + block(x)/L": (
        lambda w, b: resmlp(w, b, residual="scaled"),
        _adam(),
        MODNORM_LRS,
    ),
    "plain residuals + norm before the head": (
        lambda w, b: resmlp(w, b, residual="plain", final_norm=True),
        _adam(),
        MODNORM_LRS,
    ),
}


STEPS = 200  # the transfer sweeps' budget

Job = tuple[str, int, int, float, int, int]  # variant, width, blocks, log2 lr, steps, seed


def train_row(job: Job, cfg: ex.SweepConfig, data: Any, build: ex.Builder) -> dict[str, Any]:
    """One ablation run: ``build``'s network and optimizer trained by the harness's loop on
    one thread (denormals flushed, as the sweeps), as a row of the results."""
    name, width, blocks, k, steps, seed = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    r = ex.train_one(cfg, data, "modnorm-adam", width, blocks, 2.0**k, seed, build=build)
    return {"variant": name, "width": width, "blocks": blocks, "log2_lr": k, "steps": steps,
            "seed": seed, "train_loss": r["train_loss"],
            "val_loss": r["val_loss"], "diverged": r["diverged"]}  # fmt: skip


def on_digits(job: Job, make: Callable[[int, int, float], tuple[Any, list[Any]]]) -> dict[str, Any]:
    """One run in the `wide` sweep's setting (digits with fresh input noise, batch 128):
    ``make(width, blocks, lr)`` builds the network and its optimizers."""
    _, _, blocks, _, steps, _ = job
    cfg = ex.SweepConfig(steps=steps, batch_size=128, input_noise=1.0, depth=blocks)
    data = mn_data.load("digits", input_noise=1.0)

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        return make(width, depth, lr)

    return train_row(job, cfg, data, build)


def run(job: Job) -> dict[str, Any]:
    make_net, make_opt, _ = VARIANTS[job[0]]

    def make(width: int, blocks: int, lr: float) -> tuple[Module, list[Any]]:
        net = make_net(width, blocks)
        return net, [make_opt(net, lr)]

    return on_digits(job, make)


def ablate(
    description: str,
    grids: dict[str, list[int]],
    run: Callable[[Job], dict[str, Any]],
    width: int,
    out: Path,
    title: Callable[[int, int, int], str],
    steps: int,
) -> None:
    """The command line of an ablation: run the chosen variants over their lr grids
    (``grids``: log2 lrs by variant) in a pool of processes, then `report` them."""
    commas = [n for n in grids if "," in n]
    if commas:  # --variants is a comma-separated list
        raise ValueError(f"variant names must not contain commas: {commas}")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=steps, help=f"default {steps}")
    parser.add_argument(
        "--lrs",
        help="comma-separated log2 lrs, run instead of each variant's grid (e.g. --lrs=-8,-7.5)",
    )
    parser.add_argument("--variants", default=",".join(grids), help="comma-separated")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument(
        "--resume", action="store_true", help="skip the runs the output file already holds"
    )
    args = parser.parse_args()
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in grids]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {list(grids)}")
    chosen = {n: [_log2(k) for k in args.lrs.split(",")] if args.lrs else grids[n] for n in names}
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [
        (n, args.width, args.blocks, k, args.steps, s)
        for n in names
        for k in chosen[n]
        for s in seeds
    ]
    budget = "" if args.steps == steps else f"_steps{args.steps}"
    path = args.out / f"width{args.width}_blocks{args.blocks}{budget}.json"
    if args.resume:
        jobs = unsaved(jobs, path)
        print(f"resuming {path}: {len(jobs)} runs to go")
    rows: list[dict[str, Any]] = []
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for row in pool.imap_unordered(run, jobs, chunksize=1):
            rows.append(row)
            save(rows, path)  # an interrupted ablation keeps the runs it finished
    report(rows, names, title(args.width, args.blocks, args.steps), path)


def _log2(text: str) -> float:
    """A log2 lr from the command line: an integer stays one (the rows' keys), 1.5 is 2^1.5."""
    x = float(text)
    return int(x) if x.is_integer() else x


def _key(r: dict[str, Any]) -> tuple[str, float, int]:
    return r["variant"], r["log2_lr"], r.get("seed", 0)  # rows from before seeds are seed 0


def unsaved(jobs: list[Job], path: Path) -> list[Job]:
    """The ``jobs`` whose run (variant, width, blocks, lr, steps, seed) ``path`` does not
    hold yet; a row without a field (older files) matches any value of it, but rows from
    before seeds are seed 0."""
    if not path.exists():
        return jobs
    rows = json.loads(path.read_text())["rows"]
    fields = ("variant", "width", "blocks", "log2_lr", "steps", "seed")

    def done(job: Job) -> bool:
        return any(
            all({"seed": 0, **r}.get(f, v) == v for f, v in zip(fields, job, strict=True))
            for r in rows
        )

    return [j for j in jobs if not done(j)]


def save(rows: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write ``rows`` to ``path`` and return all its rows: the runs not repeated this time
    keep their rows from an earlier file."""
    if path.exists():
        ran = {_key(r) for r in rows}
        kept = [r for r in json.loads(path.read_text())["rows"] if _key(r) not in ran]
        rows = kept + rows
    rows = sorted(rows, key=_key)
    ex.write_json_atomic(path, {"torch": torch.__version__, "rows": rows})
    return rows


def report(rows: list[dict[str, Any]], names: list[str], title: str, path: Path) -> None:
    """Print each variant's best lr and loss, averaged over the seeds run at each lr (with
    every lr tied with it at the printed precision; ``*``: one of them on the edge of the lrs
    it has run; ``±``: the standard deviation over seeds at the best lr), with the rows
    `save` keeps in ``path``."""
    rows = save(rows, path)
    print(title)
    print("| variant | seeds | best lr | best train loss | at each lr |\n|---|---|---|---|---|")
    for n in names:
        by_lr: dict[float, list[float]] = {}
        for r in rows:
            if r["variant"] == n:
                by_lr.setdefault(r["log2_lr"], []).append(r["train_loss"])
        grid = sorted(by_lr)
        mean = {k: statistics.fmean(v) for k, v in by_lr.items()}
        best = min(grid, key=lambda k: mean[k])
        # every finite lr the table cannot tell from the best is shown; any on the edge: "*"
        tied = [
            k for k in grid if math.isfinite(mean[k]) and f"{mean[k]:.3f}" == f"{mean[best]:.3f}"
        ]
        tied = tied or [best]
        spread = f" ± {statistics.stdev(by_lr[best]):.3f}" if len(by_lr[best]) > 1 else ""
        seeds = "/".join(str(len(by_lr[k])) for k in grid)
        each = ", ".join(f"2^{k:g}: {mean[k]:.3f}" for k in grid)
        on_edge = any(k in (grid[0], grid[-1]) for k in tied)
        lrs = " = ".join(f"2^{k:g}" for k in tied)
        print(f"| {n} | {seeds} | {lrs}{'*' if on_edge else ''} "
              f"| {mean[best]:.3f}{spread} | {each} |")  # fmt: skip
    print(f"(* on the grid's edge) wrote {path}")


def main() -> None:
    ablate(
        __doc__.splitlines()[0],
        {name: grid for name, (_, _, grid) in VARIANTS.items()},
        run,
        1024,
        Path(__file__).parent / "results" / "adam_gap",
        lambda w, b, n: f"ResMLP width {w}, {b} blocks; train loss (last 10 % of {n} steps)",
        STEPS,
    )


if __name__ == "__main__":
    main()
