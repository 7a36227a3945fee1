"""Why a logit multiplier helps a wide ResMLP more than a narrow one (issue #6).

``ResMLP(output_scale=4)`` closes most of modnorm-adam's loss gap at width 1024 and changes
little at width 32 (benchmarks/RESULTS.md). This trains the transfer benchmark's ResMLP
(digits with fresh input noise, 200 steps of 128, linear decay, 2 blocks) at several widths,
with and without the multiplier, each at its best lr of the sweeps, and records on a fixed
batch, every few steps, the logits' RMS as the product of four factors:

    RMS(logits) = output_scale × ‖head‖ × alignment × RMS(h)

where ``h`` is the head's input, ``‖head‖`` its RMS→RMS operator norm (the largest singular
value of the weight: modnorm's norm of the atom) and ``alignment = RMS(head(h)) / (‖head‖ ·
RMS(h)) ∈ [0, 1]``: how much of ``h`` lies along the head's top singular directions. A
rank-10 head on random ``d``-dimensional features has alignment ``√(10/d)``.

    python benchmarks/logit_scale.py --jobs 2     # widths 32, 256, 1024, 3 seeds: ~15 min
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
from pathlib import Path
from typing import Any

import torch

from modnorm import compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim
from modnorm.modules import Module

OUT = Path(__file__).parent / "results" / "logit_scale"
EVERY = 10  # steps between probes
# name: (output_scale, head's initial weights × this, head's mass, log2 lrs). The first two
# at their best lr of the transfer sweeps (the same at every width); the others on a grid.
VARIANTS: dict[str, tuple[float, float, float, list[int]]] = {
    "nominal": (1.0, 1.0, 1.0, [-1]),
    "logits x4": (4.0, 1.0, 1.0, [0]),
    "head init x4": (1.0, 4.0, 1.0, [-3, -2, -1, 0]),  # the multiplier's initial logits only
    "logits x4 with head init /4": (4.0, 0.25, 1.0, [-1, 0, 1]),  # its updates only
    # the head's share of each step m/(m + 2) instead of 1/3, the two other atoms' 1/(m + 2)
    "head mass 2": (1.0, 1.0, 2.0, [-2, -1, 0]),
    "head mass 4": (1.0, 1.0, 4.0, [-2, -1, 0]),  # the same training as the one above it
    "head mass 8": (1.0, 1.0, 8.0, [-2, -1, 0]),
}


def head_of(net: torch.nn.Module) -> torch.nn.Module:
    """The one Linear onto the 10 classes (modnorm's, or torch's in a ``torch.nn`` model)."""
    heads = [m for m in net.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
             and m.weight.ndim == 2 and m.weight.shape[0] == 10]  # fmt: skip
    assert len(heads) == 1, "one Linear onto the 10 classes"
    return heads[0]


@torch.no_grad()
def probe(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float) -> dict[str, float]:
    """The factors of the logits' RMS on the batch ``x``, and the loss there."""
    head = head_of(net)
    seen: dict[str, torch.Tensor] = {}
    hook = head.register_forward_hook(lambda m, i, o: seen.update(h=i[0], z=o))
    try:
        logits = net(x)
    finally:
        hook.remove()
    h, z = seen["h"], seen["z"]
    rms = lambda t: float(t.square().mean().sqrt())  # noqa: E731
    norm = float(torch.linalg.matrix_norm(head.weight.float(), ord=2))
    # the multiplier of the logits that would minimize the loss on this batch, as they are
    temps = 2.0 ** torch.linspace(-2, 3, 201)
    losses = torch.stack([ex.loss_fn(t * logits, y) for t in temps])
    best = int(losses.argmin())
    return {
        "loss": float(ex.loss_fn(logits, y)),
        "best_temperature": float(temps[best]),
        "loss_at_best_temperature": float(losses[best]),
        "logits_rms": rms(logits),
        "head_norm": norm,
        "alignment": rms(z) / (norm * rms(h)),
        "h_rms": rms(h),
        "check": rms(logits) / (scale * rms(z)),  # 1: nothing comes after the head
    }


def network(name: str, width: int, depth: int = 2) -> Module:
    """The benchmark's ResMLP as the variant ``name`` changes it (from torch's global RNG)."""
    scale, init, mass, _ = VARIANTS[name]
    net = compounds.ResMLP(64, 10, width, depth, output_scale=scale, head_mass=mass)
    with torch.no_grad():
        head_of(net).weight.mul_(init)  # drawn last: the other weights are unchanged
    return net


def run(job: tuple[str, int, int, int]) -> dict[str, Any]:
    name, width, log2_lr, seed = job
    scale = VARIANTS[name][0]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = ex.SweepConfig(steps=200, batch_size=128, input_noise=1.0, depth=2)
    data = mn_data.load("digits", input_noise=1.0)
    x, y = data.batch(512, torch.Generator().manual_seed(123), cfg.context)
    probes: list[dict[str, Any]] = []
    nets: list[torch.nn.Module] = []

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = network(name, width, depth)
        nets.append(net)
        probes.append({"step": 0, **probe(net, x, y, scale)})
        return net, [mn_optim.Adam(net, lr=lr)]

    def on_step(step: int, loss: float) -> None:
        if (step + 1) % EVERY == 0:
            probes.append({"step": step + 1, **probe(nets[0], x, y, scale)})

    lr = 2.0**log2_lr
    r = ex.train_one(cfg, data, "modnorm-adam", width, 2, lr, seed, on_step=on_step, build=build)
    return {"variant": name, "width": width, "seed": seed, "log2_lr": log2_lr,
            "train_loss": r["train_loss"], "probes": probes}  # fmt: skip


def _mean(rows: list[dict[str, Any]], key: str, step: int) -> float:
    vals = [next(p[key] for p in r["probes"] if p["step"] == step) for r in rows]
    return sum(vals) / len(vals)


def best_runs(rows: list[dict[str, Any]], name: str, width: int) -> list[dict[str, Any]]:
    """The variant's runs (every seed) at its lr of lowest mean train loss at this width."""
    mine = [r for r in rows if r["variant"] == name and r["width"] == width]
    by_lr: dict[int, list[dict[str, Any]]] = {}
    for r in mine:
        by_lr.setdefault(r["log2_lr"], []).append(r)
    return min(by_lr.values(), key=lambda rs: sum(r["train_loss"] for r in rs) / len(rs))


def report(rows: list[dict[str, Any]]) -> str:
    """Per width and variant at its best lr, means over seeds: the train loss (and its seed
    sd), and the factors at initialization, after 20 steps and at the end."""
    out = ["| width | variant | lr | train loss (sd) | RMS(logits) (init, 20, 200) "
           "| alignment (init, 20, 200) | ‖head‖ (20, 200) | RMS(h) (200) "
           "| best multiplier (200) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    names = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    for width in sorted({r["width"] for r in rows}):
        for name in names:
            if not any(r["variant"] == name and r["width"] == width for r in rows):
                continue
            mine = best_runs(rows, name, width)
            losses = [r["train_loss"] for r in mine]
            mean = sum(losses) / len(losses)
            sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / max(1, len(losses) - 1))

            def f(key: str, steps: tuple[int, ...], digits: int = 2) -> str:
                return ", ".join(f"{_mean(mine, key, s):.{digits}f}" for s in steps)  # noqa: B023

            grid = VARIANTS[name][-1]
            edge = "*" if len(grid) > 1 and mine[0]["log2_lr"] in (grid[0], grid[-1]) else ""
            out.append(
                f"| {width} | {name} | 2^{mine[0]['log2_lr']}{edge} | {mean:.3f} ({sd:.3f}) "
                f"| {f('logits_rms', (0, 20, 200))} | {f('alignment', (0, 20, 200), 3)} "
                f"| {f('head_norm', (20, 200))} | {f('h_rms', (200,))} "
                f"| {f('best_temperature', (200,))} |"
            )
    return "\n".join(out)


def draw(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "logits_rms", "alignment", "head_norm", "best_temperature"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    widths = sorted({r["width"] for r in rows})
    names = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    styles = ["-", "--", ":", "-.", (0, (1, 3)), (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]
    for ax, key in zip(axes, keys, strict=True):
        for i, width in enumerate(widths):
            color = plt.cm.viridis(i / max(1, len(widths) - 1))
            for name, style in zip(names, styles, strict=False):
                if not any(r["variant"] == name and r["width"] == width for r in rows):
                    continue
                mine = best_runs(rows, name, width)
                steps = [p["step"] for p in mine[0]["probes"]]
                ax.plot(steps, [_mean(mine, key, s) for s in steps], linestyle=style, color=color,
                        label=f"width {width}, {name}")  # fmt: skip
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        if key == "loss":
            ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", default="32,256,1024")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the saved results' table")
    args = parser.parse_args()
    if args.table:
        print(report(json.loads((args.out / "results.json").read_text())["rows"]))
        return
    names = [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    jobs = [(n, int(w), k, seed) for w in args.widths.split(",") for n in names
            for k in VARIANTS[n][-1] for seed in range(args.seeds)]  # fmt: skip
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        rows = pool.map(run, jobs, chunksize=1)
    checks = [p["check"] for r in rows for p in r["probes"]]
    assert all(math.isclose(c, 1, rel_tol=1e-4) for c in checks), "something follows the head"
    path = args.out / "results.json"
    if path.exists():  # the variants and widths not run this time keep their earlier rows
        ran = {(n, w) for n, w, _, _ in jobs}
        rows = [r for r in json.loads(path.read_text())["rows"]
                if (r["variant"], r["width"]) not in ran] + rows  # fmt: skip
    ex.write_json_atomic(path, {"torch": torch.__version__, "rows": rows})
    draw(rows, args.out / "factors.png")
    print(report(rows))
    print(f"(* best lr on its grid's edge) wrote {args.out}/results.json, factors.png")


if __name__ == "__main__":
    main()
