"""Figures of a sweep: loss against learning rate (log2 axis), one curve per width or depth,
one panel per optimizer; diverged runs drawn as crosses on the top edge."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (creating its folder) and close it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    _pyplot().close(fig)
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    return plt


# Panels per row: nine methods side by side made a figure 4,000 pixels wide.
_COLUMNS = 3


def draw_sweeps(sweeps: list[dict[str, Any]], path: str | Path, metric: str = "train_loss") -> Path:
    """One block of rows per sweep (results as written by ``run_sweep``), one panel per
    optimizer, at most ``_COLUMNS`` panels to a row."""
    plt = _pyplot()
    optimizers = sorted({o for s in sweeps for o in s["config"]["optimizers"]}, key=_order)
    cols = min(len(optimizers), _COLUMNS)
    per_sweep = math.ceil(len(optimizers) / cols)
    rows = len(sweeps) * per_sweep
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for block in range(len(sweeps)):  # the empty panels at the end of each sweep's rows
        for k in range(len(optimizers), per_sweep * cols):
            grid[block * per_sweep + k // cols][k % cols].set_visible(False)
    for i, sweep in enumerate(sweeps):
        cfg = sweep["config"]
        summary = sweep.get("summary", {})
        finite = [
            r[metric] for r in sweep["runs"] if r[metric] is not None and math.isfinite(r[metric])
        ]
        top = min(max(finite), 3 * min(finite)) if finite else 1.0
        bottom = min(finite) * 0.9 if finite else 0.1
        for j, opt in enumerate(optimizers):
            ax = grid[i * per_sweep + j // cols][j % cols]
            _panel(
                ax, sweep, opt, metric, top, summary.get(opt, {}) if metric == "train_loss" else {}
            )
            ax.set_ylim(bottom, top * 1.08)
            ax.set_yscale("log")
            drift = summary.get(opt, {}).get("drift_octaves")
            title = f"{opt} — {cfg['model']} {cfg['scale']}"
            if drift is not None and metric == "train_loss":
                title += f"\ndrift {drift:.1f} octaves"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("log2 learning rate")
            if j % cols == 0:
                ax.set_ylabel(metric.replace("_", " "))
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _order(name: str) -> tuple[int, str]:
    return (0 if name.startswith("modnorm") else 1, name)


def _panel(
    ax: Any, sweep: dict[str, Any], opt: str, metric: str, top: float, summary: dict[str, Any]
) -> None:
    import matplotlib

    cfg = sweep["config"]
    values = sorted(cfg["values"])
    cmap = matplotlib.colormaps["viridis"]
    for k, v in enumerate(values):
        color = cmap(k / max(1, len(values) - 1))
        by_lr: dict[float, list[float]] = {}
        for r in sweep["runs"]:
            if r["optimizer"] == opt and r[cfg["scale"]] == v:
                by_lr.setdefault(r["lr"], []).append(r[metric] if not r["diverged"] else math.inf)
        if not by_lr:
            continue
        lrs = sorted(by_lr)
        means = [sum(by_lr[lr]) / len(by_lr[lr]) for lr in lrs]
        xs = [math.log2(lr) for lr in lrs]
        ok = [(x, y) for x, y in zip(xs, means, strict=True) if math.isfinite(y)]
        if ok:
            ax.plot(
                *zip(*ok, strict=True), "-o", color=color, ms=3, lw=1.4, label=f"{cfg['scale']} {v}"
            )
        bad = [x for x, y in zip(xs, means, strict=True) if not math.isfinite(y)]
        if bad:
            ax.plot(bad, [top * 1.05] * len(bad), "x", color=color, ms=6)
        best = summary.get("best_lr", {}).get(str(v))
        if best:
            ax.axvline(math.log2(best), color=color, lw=0.8, ls=":")
    ax.legend(fontsize=7, loc="upper center")


def draw_curves(sweep: dict[str, Any], path: str | Path) -> Path:
    """Training curves of each optimizer at its own best learning rate, one line per scale."""
    plt = _pyplot()
    import matplotlib

    cfg = sweep["config"]
    summary = sweep["summary"]
    optimizers = sorted(summary, key=_order)
    fig, axes = plt.subplots(
        1, len(optimizers), figsize=(4.2 * len(optimizers), 3.2), squeeze=False
    )
    cmap = matplotlib.colormaps["viridis"]
    values = sorted(cfg["values"])
    for j, opt in enumerate(optimizers):
        ax = axes[0][j]
        for k, v in enumerate(values):
            best = summary[opt]["best_lr"].get(str(v))
            runs = [
                r
                for r in sweep["runs"]
                if r["optimizer"] == opt and r[cfg["scale"]] == v and not r["diverged"]
            ]
            if best is None or not runs:
                continue
            lr = min({r["lr"] for r in runs}, key=lambda x: abs(math.log2(x) - math.log2(best)))
            run = next(r for r in runs if r["lr"] == lr)
            xs = [
                i * (run["steps_done"] - 1) / max(1, len(run["curve"]) - 1)
                for i in range(len(run["curve"]))
            ]
            ax.plot(xs, run["curve"], color=cmap(k / max(1, len(values) - 1)), lw=1, label=f"{v}")
        ax.set_yscale("log")
        ax.set_title(f"{opt} at its best lr", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, title=cfg["scale"], title_fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
