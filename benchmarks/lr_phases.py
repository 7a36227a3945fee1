"""When in training a larger lr wins or loses, from a saved transfer sweep (issue #6).

A best lr that falls with width says the larger lr loses at the wide model; this says when.
For each method and scale of a sweep's ``results.json`` (`benchmarks.transfer`), it splits
every run's training curve (the loss of each logged training batch) into ``--parts`` equal
stretches and prints, per stretch, the ratio of the mean loss at lr ``--high`` to the mean
at lr ``--low`` (each mean over the seeds and the stretch's logged points): below 1 the
larger lr is ahead there, above 1 behind.

    python -m benchmarks.lr_phases benchmarks/results/transfer/full/rescnn-width/results.json \\
        --methods modnorm-dual,modnorm-dual-unfolded,modnorm-dual-unfolded-all --high 0 --low -1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path
from typing import Any


def phase_ratios(
    results: dict[str, Any], method: str, high: float, low: float, parts: int
) -> dict[int, list[float]]:
    """Per scale value, the ratio (lr 2^high over lr 2^low) of the mean training loss in
    each of ``parts`` equal stretches of the curve; a scale where either lr has no
    finished run is left out."""
    scale = results["config"]["scale"]
    ratios: dict[int, list[float]] = {}
    for value in results["config"]["values"]:

        def means(log2_lr: float, value: int = value) -> list[float] | None:
            curves = [
                r["curve"]
                for r in results["runs"]
                if r["optimizer"] == method
                and r[scale] == value
                and r["lr"] == 2.0**log2_lr
                and not r["diverged"]
            ]
            if not curves or len({len(c) for c in curves}) != 1 or len(curves[0]) < parts:
                return None
            n = len(curves[0])
            bounds = [round(i * n / parts) for i in range(parts + 1)]
            return [
                statistics.fmean(x for c in curves for x in c[a:b])
                for a, b in itertools.pairwise(bounds)
            ]

        hi, lo = means(high), means(low)
        if hi is not None and lo is not None:
            ratios[value] = [h / q for h, q in zip(hi, lo, strict=True)]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a sweep's results.json")
    parser.add_argument("--methods", required=True, help="comma-separated")
    parser.add_argument("--high", type=float, required=True, help="log2 of the larger lr")
    parser.add_argument("--low", type=float, required=True, help="log2 of the smaller lr")
    parser.add_argument("--parts", type=int, default=5)
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    scale = results["config"]["scale"]
    head = " | ".join(f"part {i + 1}" for i in range(args.parts))
    print(f"loss at lr 2^{args.high:g} / loss at lr 2^{args.low:g}, per part of training")
    print(f"| method | {scale} | {head} |\n|---|---|{'---|' * args.parts}")
    for method in args.methods.split(","):
        for value, ratios in phase_ratios(results, method, args.high, args.low, args.parts).items():
            print(f"| {method} | {value} | " + " | ".join(f"{x:.3f}" for x in ratios) + " |")


if __name__ == "__main__":
    main()
