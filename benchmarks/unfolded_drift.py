"""Why modnorm-dual's lr moves with width on the unfolded ResCNN (issue #6).

On the affine 2-block ResCNN (digits as 8 × 8 images with fresh input noise, 200 steps of
128, linear decay) modnorm-dual's best lr holds from width 16 to 128 with per-position
convolutions (2^0 at both: benchmarks/muon_split.py's table) and falls 1.5 octaves with
unfolded ones (2^0.5 → 2^-1: the published grid's ``modnorm-dual-unfolded-all``, every
convolution unfolded, the stem's too). A step of
modular norm η moves the output by at most η (the well-normed bound); the lr has to make
up for how much less the real step moves it, and stop where the landscape curves. This
trains each network as the harness does (both at lr 2^0) and, every ``--every`` steps,
takes the update Δ the optimizer applied and measures, at the weights it was taken from:

- how far Δ, rescaled to modular norm η = 1e-3, moves the logits
  (`modnorm.diagnostics.well_normed`, float64, the step's batch): the whole step, and each
  atom moved alone against its own bound ``(μ_i/μ)·η``, summed by role;
- the loss on a held-out batch along ``w + c·Δ``, ``c`` = 2^-3 … 2^3 in half octaves: the
  best ``c`` says how far the step was from the length the landscape wanted;
- the slope ``−∇L·Δ`` and the curvature ``ΔᵀHΔ`` (central difference at ``c = ±1/4``) on
  the step's batch;

and, over the whole run, each part's straightness ``‖W_T − W_0‖ / Σ_t ‖Δ_t‖`` (the atoms'
own norms, summed over the part's atoms): 1 when every step went the same way, small when
the steps cancel, so the distance a given lr travels.

    python -m benchmarks.unfolded_drift --jobs 2     # about 8 minutes on 2 cores
    python -m benchmarks.unfolded_drift --table      # the table, from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.muon_split import roles
from benchmarks.rescnn_gap import affine_rescnn
from modnorm import data as mn_data
from modnorm import diagnostics
from modnorm import experiments as ex

OUT = Path(__file__).parent / "results" / "unfolded_drift"
# One lr for both, on the harness's grid: per position the best at every width (muon_split's
# table); unfolded within 0.5 % of the best at width 16 (2^0.5 between grid points), an
# octave above the best at width 128 (the published grid's rescnn-width sweep)
LOG2_LR = {"per-position": 0.0, "unfolded": 0.0}
PARTS = ("stem", "block convs", "head")  # the matrix atoms; the biases and gains are small


def _loss_along(
    net: torch.nn.Module,
    start: list[torch.Tensor],
    delta: list[torch.Tensor],
    c: float,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> float:
    """The loss on ``batch`` with ``net``'s weights set to ``start + c·delta``."""
    with torch.no_grad():
        for p, s, d in zip(net.parameters(), start, delta, strict=True):
            p.copy_(s + c * d)
        return float(ex.loss_fn(net(batch[0]), batch[1]))


def _spectral(atom: Any, t: torch.Tensor) -> float:
    """The matrix atom's norm of ``t`` (its largest spectral norm over its matrices: the
    kernel positions, or the unfolded kernel), by exact SVD: the warm starts stay untouched."""
    return float(torch.linalg.matrix_norm(atom._mats(t).double(), ord=2).max())


def run(job: tuple[str, int, int, int]) -> dict[str, Any]:
    """Train one network (the harness's loop: `modnorm.experiments.train_one`'s seeds, batches
    and schedule) and measure its update every ``every`` steps."""
    variant, width, seed, every = job
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    steps, lr = 200, 2.0 ** LOG2_LR[variant]
    data = mn_data.load("digits", image=True, input_noise=1.0)
    torch.manual_seed(seed)
    unfold = variant == "unfolded"  # the stem's convolution too, as the published runs it explains
    net = affine_rescnn(width, 2, unfolded=(unfold, unfold))
    opt = ex.build_optimizer("modnorm-dual", net, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(10_000 + seed)
    atoms = [a for a, _ in net.atom_shares()]
    names = roles(atoms)
    mats = [(a, n) for a, n in zip(atoms, names, strict=True) if n in PARTS]
    start = [a.weight.detach().clone() for a, _ in mats]
    path = dict.fromkeys(PARTS, 0.0)  # Σ_t ‖Δ_t‖ over each part's atoms, in their own norms
    held = data.batch(512, torch.Generator().manual_seed(77_777))  # not in the training stream
    losses, records = [], []
    for step in range(steps):
        x, y = data.batch(128, gen)
        loss = ex.loss_fn(net(x), y)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in net.parameters()] if step % every == 0 else None
        mat_before = [a.weight.detach().clone() for a, _ in mats]
        opt.step()
        sched.step()
        for (a, n), b in zip(mats, mat_before, strict=True):
            path[n] += _spectral(a, a.weight.detach() - b)
        if before is None:
            continue
        delta = [p.detach() - b for p, b in zip(net.parameters(), before, strict=True)]
        after = [p.detach().clone() for p in net.parameters()]
        slope = -sum(
            float((p.grad * d).sum()) for p, d in zip(net.parameters(), delta, strict=True)
        )

        along = {k / 2: _loss_along(net, before, delta, 2.0 ** (k / 2), held) for k in range(-6, 7)}
        h, batch = 0.25, (x, y)
        ends = _loss_along(net, before, delta, h, batch) + _loss_along(
            net, before, delta, -h, batch
        )
        curvature = (ends - 2 * _loss_along(net, before, delta, 0.0, batch)) / h**2
        # _loss_along(.., 0.0, ..) left the weights the step was taken from: measure there
        rep = diagnostics.well_normed(net, x, step=delta, eta=1e-3)
        with torch.no_grad():
            for p, a in zip(net.parameters(), after, strict=True):
                p.copy_(a)
        part = {
            r: sum(row.linear for row, n in zip(rep.rows, names, strict=True) if n == r)
            / sum(row.bound for row, n in zip(rep.rows, names, strict=True) if n == r)
            for r in PARTS
        }
        records.append({"step": step, "network": rep.linear_ratio, **part,
                        "best_log2_c": min(along, key=along.__getitem__), "slope": slope,
                        "curvature": curvature})  # fmt: skip
    moved = dict.fromkeys(PARTS, 0.0)  # ‖W_T − W_0‖ over each part's atoms
    for (a, n), w0 in zip(mats, start, strict=True):
        moved[n] += _spectral(a, a.weight.detach() - w0)
    tail = losses[-max(1, steps // 10) :]
    return {"variant": variant, "width": width, "seed": seed, "log2_lr": LOG2_LR[variant],
            "train_loss": sum(tail) / len(tail), "records": records,
            "straightness": {n: moved[n] / path[n] for n in PARTS}}  # fmt: skip


def report(rows: list[dict[str, Any]]) -> None:
    """Each measure (mean over the logged steps after the first, and seeds) per width."""
    print("network … head: output change per unit of the modular norm of modnorm-dual's own "
          "update (linearized, logits' worst-row RMS; ≤ 1 is the bound); best_log2_c: the "
          "step's best multiple on a held-out batch; slope −∇L·Δ and curvature ΔᵀHΔ on the "
          "step's batch. Means over the logged steps after step 0\n")  # fmt: skip
    cols = ["network", *PARTS, "best_log2_c", "slope", "curvature"]
    straight = [f"straightness {n}" for n in PARTS]
    print(f"| variant | width | lr | loss | step-0 network | {' | '.join(cols + straight)} |")
    print("|---|---|---|---|---|" + "---|" * (len(cols) + len(straight)))
    for variant, width in sorted({(r["variant"], r["width"]) for r in rows}):
        mine = [r for r in rows if r["variant"] == variant and r["width"] == width]
        loss = statistics.fmean(r["train_loss"] for r in mine)
        first = statistics.fmean(r["records"][0]["network"] for r in mine)
        cells = [
            statistics.fmean(rec[c] for r in mine for rec in r["records"][1:]) for c in cols
        ] + [statistics.fmean(r["straightness"][n] for r in mine) for n in PARTS]
        print(f"| {variant} | {width} | 2^{mine[0]['log2_lr']:g} | {loss:.3f} | {first:.3f} | "
              + " | ".join(f"{c:.3f}" for c in cells) + " |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="16,32,64,128")
    parser.add_argument("--variants", default="per-position,unfolded")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of the saved JSON")
    args = parser.parse_args()
    path = args.out / "drift.json"
    if args.table:
        report(json.loads(path.read_text())["rows"])
        return
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = sorted(set(variants) - set(LOG2_LR))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {sorted(LOG2_LR)}")
    jobs = [(v, int(w), int(s), args.every) for v in variants
            for w in args.widths.split(",") for s in args.seeds.split(",")]  # fmt: skip
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run, jobs, chunksize=1)
    report(rows)
    ex.write_json_atomic(path, {"torch": torch.__version__, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
