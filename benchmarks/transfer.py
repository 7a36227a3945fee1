"""Learning-rate transfer, side by side: modnorm's optimizers against standard practice, μP,
u-μP, Muon and the reference Modula, on the same data, seeds, steps and log2 lr grid.

    python -m benchmarks.transfer --suite quick     # ResMLP width and depth, 1 seed
    python -m benchmarks.transfer --suite quick3    # the same, 3 seeds
    python -m benchmarks.transfer --suite wide      # ResMLP width 32 and 1024, 1 seed
    python -m benchmarks.transfer --suite models    # ResCNN and GPT width and depth, 1 seed
    python -m benchmarks.transfer --suite full      # the published grid (resumable)
    python -m benchmarks.transfer --suite quick --table   # print the tables of saved results
    python -m benchmarks.transfer --refresh-docs    # docs/transfer.md's tables from the JSON
    python -m benchmarks.transfer --suite full --sweeps gpt-width --device cuda --jobs 14

``--jobs N`` runs N runs at a time, each in its own process (one torch thread each unless
``--threads``): 2 on a 2-core machine keeps both cores busy, and a GPU takes many small
models at once. Results do not depend on it, wall times do (``environment.jobs``).

Each sweep is a ``modnorm.experiments.run_sweep`` whose methods are built by
``benchmarks.peers``; it writes ``OUT/<sweep>/results.json`` (runs, summary, skipped methods,
command), ``lr.png`` (loss against lr, one curve per scale, one panel per method) and
``curves.png`` (training curves at each method's own best lr). A method whose package is
missing, or that has no version of a sweep's model, is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.peers import METHODS
from modnorm import data as mn_data
from modnorm import experiments as ex
from modnorm.plots import draw_curves, draw_sweeps

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare.txt"
DOCS_PAGE = ROOT / "docs" / "transfer.md"  # the results page of the documentation site
NOISE = 1.0  # fresh input noise on digits, so the loss is not memorized (DESIGN §3)


@dataclass(frozen=True)
class Sweep:
    """A named sweep of a suite; its ``optimizers`` are filled in with the runnable methods."""

    name: str
    config: ex.SweepConfig


def _cfg(**kw: Any) -> ex.SweepConfig:
    return ex.SweepConfig(optimizers=[], **kw)


def _sweeps(
    model: str, widths: list[int], depths: list[int], depth_width: int | None = None, **common: Any
) -> list[Sweep]:
    """``<model>-width`` over ``widths`` and, if ``depths``, ``<model>-depth`` over them at
    ``depth_width`` (default: the width sweep's smallest width)."""
    sweeps = [Sweep(f"{model}-width", _cfg(model=model, scale="width", values=widths, **common))]
    if depths:
        width = min(widths) if depth_width is None else depth_width
        depth = _cfg(model=model, scale="depth", values=depths, width=width, **common)
        sweeps.append(Sweep(f"{model}-depth", depth))
    return sweeps


def _resmlp(widths: list[int], depths: list[int], lrs: str, steps: int, seeds: int) -> list[Sweep]:
    return _sweeps(
        "resmlp",
        widths,
        depths,
        depth_width=64,
        data="digits",
        lrs=ex.parse_lrs(lrs),
        steps=steps,
        batch_size=128,
        seeds=seeds,
        input_noise=NOISE,
        depth=2,
    )


def _rescnn(widths: list[int], depths: list[int], lrs: str, seeds: int) -> list[Sweep]:
    return _sweeps(
        "rescnn",
        widths,
        depths,
        data="digits",
        lrs=ex.parse_lrs(lrs),
        steps=200,
        seeds=seeds,
        input_noise=NOISE,
        depth=2,
    )


def _gpt(widths: list[int], depths: list[int], lrs: str) -> list[Sweep]:
    # CPU: a reduced budget (300 steps of 12 × 64 characters).
    return _sweeps(
        "gpt",
        widths,
        depths,
        data=f"text:{SHAKESPEARE}",
        lrs=ex.parse_lrs(lrs),
        steps=300,
        batch_size=12,
        seeds=1,
        depth=2,
        context=64,
    )


SUITES: dict[str, list[Sweep]] = {
    # Smoke-level: 8× width and 16× depth, one seed.
    "quick": _resmlp([32, 256], [2, 32], "2^-11:2^3", steps=200, seeds=1),
    # The quick suite over three seeds (seed 0's runs are the quick suite's).
    "quick3": _resmlp([32, 256], [2, 32], "2^-11:2^3", steps=200, seeds=3),
    # The 32× width of issue #6's target at the quick suite's grid and budget, one seed.
    "wide": _resmlp([32, 1024], [], "2^-11:2^3", steps=200, seeds=1),
    # The other two models at 4× width and 4× (GPT) or 8× (ResCNN) depth, the quick suite's
    # grid, one seed.
    "models": [
        *_rescnn([16, 64], [2, 16], "2^-11:2^3", 1),
        *_gpt([64, 256], [2, 8], "2^-11:2^3"),
    ],
    # The published grid (issue #6): 32× width, 16× depth, 3 seeds, a 1-octave grid. The
    # ResCNN's reaches 2^5: the modular methods' best lrs on it reach 2^3.
    "full": [
        *_resmlp([32, 64, 128, 256, 512, 1024], [2, 4, 8, 16, 32], "2^-14:2^3", 200, 3),
        *_rescnn([16, 32, 64, 128], [2, 4, 8, 16], "2^-14:2^5", 3),
        *_gpt([64, 128, 256, 512], [2, 4, 8], "2^-14:2^3"),
    ],
}


def select(
    sweeps: Sequence[Sweep],
    names: str | None,
    lrs: str | None,
    seeds: int | None = None,
    steps: int | None = None,
) -> list[Sweep]:
    """The sweeps named in ``names`` (all when ``None``), each on the grid ``lrs``, over
    ``seeds`` seeds and for ``steps`` steps if given."""
    chosen = list(sweeps)
    if names is not None:
        wanted = [n.strip() for n in names.split(",")]
        known = [sw.name for sw in sweeps]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"unknown sweep(s) {unknown}: this suite has {known}")
        chosen = [sw for sw in sweeps if sw.name in wanted]
    if lrs is not None:
        grid = ex.parse_lrs(lrs)
        chosen = [Sweep(sw.name, replace(sw.config, lrs=grid)) for sw in chosen]
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"seeds must be a positive integer, got {seeds}")
        chosen = [Sweep(sw.name, replace(sw.config, seeds=seeds)) for sw in chosen]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps}")
        chosen = [Sweep(sw.name, replace(sw.config, steps=steps)) for sw in chosen]
    return chosen


def plan(sweep: Sweep, names: Sequence[str]) -> tuple[ex.SweepConfig, dict[str, str]]:
    """The sweep's config with the methods that can run it, and why the others cannot."""
    runnable, skipped = [], {}
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}: choose from {list(METHODS)}")
        method = METHODS[name]
        why = method.missing()
        cfg = sweep.config
        if why is None and cfg.model not in method.models:
            why = f"no {cfg.model} model in this harness"
        blocks = min(cfg.values) if cfg.scale == "depth" else cfg.depth
        if why is None and blocks < method.min_blocks:
            why = f"needs at least {method.min_blocks} blocks, the sweep has {blocks}"
        if why is None:
            runnable.append(name)
        else:
            skipped[name] = why
    return replace(sweep.config, optimizers=runnable), skipped


def run_suite(
    sweeps: Sequence[Sweep],
    out: Path,
    methods: Sequence[str] = tuple(METHODS),
    progress: bool = True,
    figures: bool = True,
    command: str = "",
    log: Any = print,
    device: str = "cpu",
    jobs: int = 1,
    reuse: Path | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) every sweep into ``out/<sweep>/`` on ``device``, ``jobs`` runs at a
    time; return the results of each. A sweep that has no results in ``out`` yet starts from
    the runs it shares with ``reuse/<sweep>/`` (see `reused_runs`); one that has some takes
    those it lacks."""
    results = []
    for sweep in sweeps:
        cfg, skipped = plan(sweep, methods)
        for name, why in skipped.items():
            log(f"{sweep.name}: skipping {name}: {why}")
        if not cfg.optimizers:
            log(f"{sweep.name}: no method can run it")
            continue
        if cfg.data.startswith("text:") and not Path(cfg.data[5:]).is_file():
            log(f"{sweep.name}: skipped, no corpus at {cfg.data[5:]}")
            continue
        source = None if reuse is None else reuse / sweep.name / "results.json"
        if source is not None and not source.exists():
            source = None
        target = out / sweep.name / "results.json"
        if source is not None:
            runs = ex.load_results(target.parent, cfg)  # an existing sweep must be cfg's
            have = {_run_key(r, cfg) for r in runs}
            new = [r for r in reused_runs(cfg, source) if _run_key(r, cfg) not in have]
            if new or not target.exists():
                doc = {"schema": ex.SCHEMA, "config": asdict(cfg), "runs": runs + new}
                ex.write_json_atomic(target, doc)
            log(f"{sweep.name}: {len(new)} runs taken from {source}")
        data = mn_data.load(cfg.data, image=cfg.model == "rescnn", input_noise=cfg.input_noise)
        builders = {name: METHODS[name].build for name in cfg.optimizers}
        r = ex.run_sweep(cfg, out / sweep.name, data, device, progress, log, builders, jobs=jobs)
        r.update(
            sweep=sweep.name,
            skipped=skipped,
            command=command,
            environment={
                "torch": torch.__version__,
                "python": platform.python_version(),
                "threads": torch.get_num_threads(),
                "jobs": jobs,  # runs at a time: wall times compare only at equal jobs
                "machine": platform.machine(),
            },
            seed_spread=seed_spread(r["runs"], cfg.scale, r["summary"]),
        )
        # each reused run names its source, so a resume without --reuse still reports it
        sources = sorted({run["reused_from"] for run in r["runs"] if "reused_from" in run})
        if sources:
            r["reused_from"] = ", ".join(sources)
        ex.write_json_atomic(out / sweep.name / "results.json", r)
        if figures:
            draw_sweeps([r], out / sweep.name / "lr.png")
            draw_curves(r, out / sweep.name / "curves.png")
        results.append(r)
    return results


def _run_key(run: dict[str, Any], cfg: ex.SweepConfig) -> str:
    return ex.run_key(run["optimizer"], run[cfg.scale], run["lr"], run["seed"])


def reused_runs(cfg: ex.SweepConfig, source: Path) -> list[dict[str, Any]]:
    """The finished runs in ``source`` (a sweep's ``results.json``) that ``cfg`` would make:
    its methods, scale values and lrs, its first ``cfg.seeds`` seeds, each with
    ``reused_from``. The saved sweep must be ``cfg`` up to those (every run depends only on
    its own method, scale, lr and seed)."""
    saved = json.loads(source.read_text())
    diff = ex.differences_beyond_grid(asdict(cfg), saved["config"])
    if diff:
        raise ValueError(f"{source} is another sweep (it differs in {diff}): nothing reused")
    wanted = {
        ex.run_key(o, v, lr, s)
        for o in cfg.optimizers
        for v in cfg.values
        for lr in cfg.lrs
        for s in range(cfg.seeds)
    }
    return [
        {"reused_from": str(source), **r}  # a run reused twice keeps where it was made
        for r in saved["runs"]
        if _run_key(r, cfg) in wanted
    ]


def seed_spread(
    runs: Sequence[dict[str, Any]], scale: str, summary: dict[str, Any]
) -> dict[str, float | None]:
    """Per method, the largest standard deviation over seeds of the final loss at a scale's
    best lr (None with one seed)."""
    out: dict[str, float | None] = {}
    for opt, s in summary.items():
        worst: float | None = None
        for v, best in s["best_lr"].items():
            if best is None:
                continue
            mine = [r for r in runs if r["optimizer"] == opt and str(r[scale]) == v]
            lr = min({r["lr"] for r in mine}, key=lambda x: abs(math.log2(x) - math.log2(best)))
            losses = [r["train_loss"] for r in mine if r["lr"] == lr]
            if len(losses) > 1 and all(math.isfinite(x) for x in losses):
                m = sum(losses) / len(losses)
                sd = math.sqrt(sum((x - m) ** 2 for x in losses) / (len(losses) - 1))
                worst = sd if worst is None else max(worst, sd)
        out[opt] = worst
    return out


# ---- tables ----------------------------------------------------------------------------------


def _lr(x: float | None) -> str:
    return "—" if x is None else f"2^{math.log2(x):g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else ("∞" if not math.isfinite(x) else f"{100 * x:.1f} %")


def _oct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def method_rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per method of a sweep: best lr per scale, drift, regret, best loss per scale,
    its largest standard deviation over seeds, edge flags, divergences, wall time."""
    rows = []
    order = [m for m in METHODS if m in result["summary"]]
    spread = result.get("seed_spread", {})
    for name in order:
        s = result["summary"][name]
        sd = spread.get(name)
        scales = list(s["best_lr"])
        edges = [v for v in scales if s["edge"][v]]
        rows.append(
            [
                name,
                ", ".join(_lr(s["best_lr"][v]) for v in scales),
                _oct(s["drift_octaves"]),
                _pct(s["regret"]),
                ", ".join(f"{s['best_loss'][v]:.3f}" for v in scales),
                "—" if sd is None else f"{sd:.3f}",
                ", ".join(edges) if edges else "none",
                str(s["diverged"]),
                f"{s['wall_time']:.0f} s",
            ]
        )
    return rows


METHOD_HEADER = [
    "method",
    "best lr per scale",
    "drift (octaves)",
    "regret",
    "best loss per scale",
    "seed sd",
    "best lr on grid edge",
    "diverged runs",
    "time",
]
SUMMARY_HEADER = ["sweep", "method", "best lr per scale", "drift (octaves)", "regret"]


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    """What a sweep was, in one line."""
    c = result["config"]
    fixed = f"depth {c['depth']}" if c["scale"] == "width" else f"width {c['width']}"
    return (
        f"{c['model']} {c['scale']} {', '.join(map(str, c['values']))} ({fixed}); "
        f"lr 2^{math.log2(min(c['lrs'])):g} … 2^{math.log2(max(c['lrs'])):g} "
        f"({len(c['lrs'])} points); {c['steps']} steps, batch {c['batch_size']}, "
        f"{c['seeds']} seed(s)"
    )


def summary_rows(results: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The README table: per sweep and method, best lr per scale, drift and regret."""
    rows = []
    for r in results:
        for row in method_rows(r):
            rows.append([r["sweep"], row[0], row[1], row[2], row[3]])
    return rows


def overview(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The README's table: one row per method, one column per sweep, each cell the drift
    (octaves), the regret and the best loss at the sweep's largest scale ("—": not run); the
    ResMLP first, then the ResCNN and the GPT, width before depth."""
    models = ("resmlp", "rescnn", "gpt")
    results = sorted(
        results,
        key=lambda r: (
            models.index(r["config"]["model"]) if r["config"]["model"] in models else len(models),
            r["config"]["model"],
            r["config"]["scale"] != "width",
        ),
    )
    header = ["method"]
    for r in results:
        values = r["config"]["values"]
        header.append(f"{r['sweep']} {min(values)} → {max(values)}")
    rows = []
    for name in [m for m in METHODS if any(m in r["summary"] for r in results)]:
        row = [name]
        for r in results:
            s = r["summary"].get(name)
            if s is None:
                row.append("—")
                continue
            last = str(max(r["config"]["values"]))
            loss = s["best_loss"].get(last)
            at_last = "—" if loss is None or not math.isfinite(loss) else f"{loss:.3f}"
            row.append(f"{_oct(s['drift_octaves'])} / {_pct(s['regret'])} / {at_last}")
        rows.append(row)
    return header, rows


def load_suite(out: Path) -> list[dict[str, Any]]:
    """Saved results of every sweep under ``out``, in name order."""
    import json

    found = [json.loads(p.read_text()) for p in out.glob("*/results.json")]
    done = [r for r in found if "summary" in r and "sweep" in r]
    return sorted(done, key=lambda r: (r["config"]["model"], r["config"]["scale"] != "width"))


def unfinished(out: Path, names: Collection[str] | None = None) -> list[str]:
    """A line for each sweep under ``out`` (of ``names``, if given) with saved runs but no
    summary yet (interrupted, or still running): `load_suite` leaves those out."""
    lines = []
    for path in sorted(out.glob("*/results.json")):
        if names is not None and path.parent.name not in names:
            continue
        saved = json.loads(path.read_text())
        if "summary" not in saved:
            cfg = saved.get("config", {})
            total = (
                len(cfg.get("optimizers", []))
                * len(cfg.get("values", []))
                * len(cfg.get("lrs", []))
                * cfg.get("seeds", 1)
            )
            n = len(saved.get("runs", []))
            lines.append(f"{path.parent.name}: unfinished, {n} of {total} runs saved")
    return lines


def report(results: Sequence[dict[str, Any]]) -> str:
    parts: list[str] = []
    for r in results:
        if parts:
            parts.append("")  # a blank line ends the previous table
        parts.append(f"### {r['sweep']}\n\n{describe(r)}\n")
        parts.append(_markdown(METHOD_HEADER, method_rows(r)))
        if r.get("skipped"):
            parts.append(
                "\nSkipped: " + "; ".join(f"{k} ({v})" for k, v in r["skipped"].items()) + "\n"
            )
    parts.append("\n### summary\n\n" + _markdown(SUMMARY_HEADER, summary_rows(results)))
    return "\n".join(parts)


_BLOCK = re.compile(r"(<!-- results: (\S+) -->\n)(.*?)(<!-- end results -->)", re.S)


def refresh_page(text: str) -> str:
    """``text`` with every block between ``<!-- results: DIR -->`` and ``<!-- end results -->``
    replaced by the report of the results saved under ``DIR`` (relative to the repository)."""

    def fill(m: re.Match[str]) -> str:
        results = load_suite(ROOT / m.group(2))
        if not results:
            raise FileNotFoundError(f"no results under {m.group(2)}")
        return f"{m.group(1)}\n{report(results)}\n\n{m.group(4)}"

    return _BLOCK.sub(fill, text)


# ---- command line --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--out", help="output directory (default benchmarks/results/transfer/SUITE)")
    p.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--sweeps", help="comma-separated subset of the suite's sweeps (by name)")
    p.add_argument(
        "--lrs", help="replace every sweep's lr grid, e.g. 2^-4:2^6 (say so beside the results)"
    )
    p.add_argument("--seeds", type=int, help="replace every sweep's number of seeds")
    p.add_argument(
        "--steps", type=int, help="replace every sweep's budget (say so beside the results)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, one process each")
    p.add_argument("--device", default="cpu", help="torch device of every run (default cpu)")
    p.add_argument(
        "--reuse",
        type=Path,
        help="take the runs each sweep lacks from the same sweep saved in this directory "
        "(e.g. more seeds, methods, scales or lrs than a committed suite)",
    )
    p.add_argument("--table", action="store_true", help="print the tables of saved results")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--refresh-docs",
        action="store_true",
        help=f"rewrite the result tables of {DOCS_PAGE.relative_to(ROOT)} from the saved JSON",
    )
    args = p.parse_args(argv)
    if args.refresh_docs:
        DOCS_PAGE.write_text(refresh_page(DOCS_PAGE.read_text()))
        print(f"wrote {DOCS_PAGE}")
        return
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / "transfer" / args.suite
    if not args.table:
        # One thread: on a shared 2-core machine, two threads that wait on each other are
        # many times slower. Denormals slow Adam near zero loss (DESIGN §3).
        torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)
        methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            p.error(f"unknown method(s) {unknown}: choose from {list(METHODS)}")
        command = "python -m benchmarks.transfer " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
        sweeps = select(SUITES[args.suite], args.sweeps, args.lrs, args.seeds, args.steps)
        run_suite(
            sweeps,
            out,
            methods,
            progress=not args.no_progress,
            command=command,
            device=args.device,
            jobs=args.jobs,
            reuse=args.reuse,
        )
    results = load_suite(out)
    names = None
    if args.sweeps:
        names = {sw.name for sw in select(SUITES[args.suite], args.sweeps, None)}
        results = [r for r in results if r["sweep"] in names]
    for line in unfinished(out, names):
        print(line, file=sys.stderr)
    print(report(results))
    if results:
        print("\n### overview: drift (octaves) / regret / best loss at the largest scale\n")
        print(_markdown(*overview(results)))


if __name__ == "__main__":
    main()
