"""How much a wide ResMLP needs to learn features, and what learning them costs (issue #6:
why a wide ResMLP trains better with a heavier head).

A heavier head (``head_mass`` m) gives the head a share m/(m + 2) of each normalized step and
the input layer and the blocks 1/(m + 2) each. As m grows the features (the head's input)
move less, and in the limit the network is a linear model on its features at
initialization. This trains the transfer benchmark's ResMLP (digits with fresh input noise,
2 blocks, linear decay) at several widths with head masses 1 … 1024 under normalized Adam
(1 and 8 also under normalized SGD), and torch Adam on the ``torch.nn`` ResMLP, and records
how far the features moved from initialization on a fixed batch: ``‖h_T − h_0‖ / ‖h_0‖``
(Frobenius, ``h`` the head's input). Two settings test what the blocks' movement costs: the
default batch of 128 and a 4× larger one (less gradient noise per step), and the default 200
steps and 4× more.

    python -m benchmarks.feature_learning --jobs 2     # about 45 minutes on 2 cores (resumable)
    python -m benchmarks.feature_learning --table      # the tables, from the saved JSON
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks import logit_scale as ls
from modnorm import baselines, compounds
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm import optim as mn_optim

OUT = Path(__file__).parent / "results" / "feature_learning"
TORCH = "torch-adam"
SGD = "SGD, "  # the prefix of normalized SGD's variants (the others: normalized Adam)
TWO = ["head mass 1", "head mass 8"]
# (name, variants, widths, batch, steps)
SETTINGS: dict[str, tuple[list[str], list[int], int, int]] = {
    "batch 128": (
        [*(f"head mass {m}" for m in (1, 2, 8, 16, 64, 1024)), *(SGD + v for v in TWO), TORCH],
        [32, 256, 1024],
        128,
        200,
    ),
    "batch 512": (TWO, [32, 256, 1024], 512, 200),
    "800 steps": (TWO, [32, 1024], 128, 800),
}


def grid(setting: str, variant: str, width: int) -> list[int]:
    """log2 lrs around each variant's best, widened until none sat on an edge (torch Adam's
    moves with width; a longer run's moves down)."""
    if variant == TORCH:
        return [-7, -6, -5, -4, -3] if width <= 64 else [-12, -11, -10, -9, -8, -7, -6]
    if setting == "800 steps":
        return [-4, -3, -2, -1, 0]
    if variant == "head mass 1024":
        return [-2, -1, 0, 1, 2, 3, 4]
    if variant == "head mass 64":
        return [-2, -1, 0, 1, 2]
    if setting == "batch 512" or variant == "head mass 16":
        return [-2, -1, 0, 1]
    return [-2, -1, 0]


def network(variant: str, width: int) -> torch.nn.Module:
    if variant == TORCH:
        return baselines.torch_resmlp(64, 10, width, 2)
    mass = float(variant.removeprefix(SGD).removeprefix("head mass "))
    return compounds.ResMLP(64, 10, width, 2, head_mass=mass)


def optimizer(variant: str, net: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """torch Adam, or modnorm's normalized SGD (momentum 0.9, as the sweeps') or Adam."""
    if variant == TORCH:
        return torch.optim.Adam(net.parameters(), lr=lr)
    if variant.startswith(SGD):
        return mn_optim.SGD(net, lr=lr, momentum=0.9)  # type: ignore[arg-type]
    return mn_optim.Adam(net, lr=lr)  # type: ignore[arg-type]


@torch.no_grad()
def features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}
    hook = ls.head_of(net).register_forward_hook(lambda m, i, o: seen.update(h=i[0]))
    try:
        net(x)
    finally:
        hook.remove()
    return seen["h"].clone()


def run(job: tuple[str, str, int, int, int]) -> dict[str, Any]:
    setting, variant, width, log2_lr, seed = job
    _, _, batch, steps = SETTINGS[setting]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    cfg = ex.SweepConfig(steps=steps, batch_size=batch, input_noise=1.0, depth=2)
    data = mn_data.load("digits", input_noise=1.0)
    x, _ = data.batch(512, torch.Generator().manual_seed(123), cfg.context)
    nets: list[torch.nn.Module] = []
    start: list[torch.Tensor] = []

    def build(cfg: Any, data: Any, width: int, depth: int, lr: float, device: str) -> Any:
        net = network(variant, width)
        nets.append(net)
        start.append(features(net, x))
        return net, [optimizer(variant, net, lr)]

    r = ex.train_one(cfg, data, variant, width, 2, 2.0**log2_lr, seed, build=build)
    moved = float((features(nets[0], x) - start[0]).norm() / start[0].norm())
    return {"setting": setting, "variant": variant, "width": width, "log2_lr": log2_lr,
            "seed": seed, "train_loss": r["train_loss"], "val_loss": r["val_loss"],
            "features_moved": moved}  # fmt: skip


def best(
    rows: list[dict[str, Any]], setting: str, variant: str, width: int
) -> list[dict[str, Any]]:
    """The runs (every seed) at the lr of lowest mean train loss (none if it has no runs)."""
    by_lr: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if (r["setting"], r["variant"], r["width"]) == (setting, variant, width):
            by_lr.setdefault(r["log2_lr"], []).append(r)
    return min(
        by_lr.values(), key=lambda rs: statistics.fmean(r["train_loss"] for r in rs), default=[]
    )


def report(rows: list[dict[str, Any]]) -> str:
    out = []
    for setting, (variants, widths, batch, steps) in SETTINGS.items():
        if not any(r["setting"] == setting for r in rows):
            continue
        out += [f"\n{setting} ({steps} steps of {batch}); mean over seeds at each variant's "
                "best lr (`*`: on its grid's edge), train loss (seed sd) / features moved\n",
                "| variant | " + " | ".join(f"width {w}" for w in widths) + " |",
                "|---|" + "---|" * len(widths)]  # fmt: skip
        for variant in variants:
            cells = []
            for w in widths:
                mine = best(rows, setting, variant, w)
                if not mine:
                    cells.append("")
                    continue
                losses = [r["train_loss"] for r in mine]
                sd = statistics.stdev(losses) if len(losses) > 1 else math.nan
                k, lrs = mine[0]["log2_lr"], grid(setting, variant, w)
                edge = "*" if k in (lrs[0], lrs[-1]) else ""
                moved = statistics.fmean(r["features_moved"] for r in mine)
                cells.append(f"{statistics.fmean(losses):.3f} ({sd:.3f}) / {moved:.2f} "
                             f"(2^{k}{edge})")  # fmt: skip
            out.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def draw(rows: list[dict[str, Any]], path: Path) -> None:
    """Train loss against how far the features moved, at each variant's best lr: one line
    per width through the head masses of normalized Adam, torch Adam as a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants, widths, batch, steps = SETTINGS["batch 128"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, w in enumerate(widths):
        color = plt.cm.viridis(i / max(1, len(widths) - 1))
        points = []
        for v in variants:
            mine = best(rows, "batch 128", v, w)
            if v.startswith(SGD) or not mine:
                continue
            moved = statistics.fmean(r["features_moved"] for r in mine)
            loss = statistics.fmean(r["train_loss"] for r in mine)
            if v == TORCH:
                ax.plot(moved, loss, "x", color=color, markersize=9)
            else:
                points.append((moved, loss, v.removeprefix("head mass ")))
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color,
                    label=f"width {w}")  # fmt: skip
            for x, y, m in points:
                ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("features moved, ‖h_T − h_0‖ / ‖h_0‖")
    ax.set_ylabel(f"train loss ({steps} steps of {batch})")
    ax.set_title("normalized Adam by head mass (numbers); torch Adam (x)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the saved results' table")
    args = parser.parse_args()
    path = args.out / "results.json"
    if args.table:
        print(report(json.loads(path.read_text())["rows"]))
        return
    names = [s.strip() for s in args.settings.split(",")]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}: choose from {list(SETTINGS)}")
    jobs = [(s, v, w, k, seed) for s in names for v in SETTINGS[s][0] for w in SETTINGS[s][1]
            for k in grid(s, v, w) for seed in range(args.seeds)]  # fmt: skip
    # resumable: the runs saved before are kept and not run again
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["setting"], r["variant"], r["width"], r["log2_lr"], r["seed"]) for r in rows}
    jobs = [j for j in jobs if j not in done]
    # the slowest first, so the pool does not end on one long run
    jobs.sort(key=lambda j: -j[2] * SETTINGS[j[0]][2] * SETTINGS[j[0]][3])
    args.out.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for row in pool.imap_unordered(run, jobs):
            rows.append(row)
            ex.write_json_atomic(path, {"torch": torch.__version__, "rows": rows})
    draw(rows, args.out / "movement.png")
    print(report(rows))
    print(f"wrote {path}, movement.png")


if __name__ == "__main__":
    main()
