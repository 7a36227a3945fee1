"""The check-schedule benchmark (``benchmarks/lanczos_checks.py``): what it counts is what
Lanczos did, and it leaves the library as it found it."""

from __future__ import annotations

import modnorm.atoms
import modnorm.linalg
from benchmarks import lanczos_checks as lc


def test_counts_copies_and_steps_and_restores_the_library() -> None:
    before = dict(modnorm.linalg._CHECK_EVERY), modnorm.atoms.spectral_norms
    rows = {e: lc.run("resmlp 512x4", e, "cpu", steps=5, warmup=2) for e in (1, 4)}
    assert (dict(modnorm.linalg._CHECK_EVERY), modnorm.atoms.spectral_norms) == before
    for every, r in rows.items():
        assert r["check_every"] == every and r["calls"] == 3  # one batched call per step
        # at least 4 steps before the first check, then one check per `every` steps or less
        steps, copies = r["lanczos_steps_per_call"], r["host_copies_per_call"]
        assert steps >= 4 and 1 <= copies <= 1 + (steps - 4) / every + 1
        assert r["worst_relative_error"] < 1e-3
    # checking less often never stops earlier
    assert rows[4]["lanczos_steps_per_call"] >= rows[1]["lanczos_steps_per_call"]


def test_fixed_steps_run_that_many_steps_with_one_copy() -> None:
    r = lc.run("resmlp 512x4", 1, "cpu", steps=3, warmup=1, optimizer="sgd", fixed=2)
    assert r["fixed_steps"] == 2 and r["optimizer"] == "sgd"
    assert r["lanczos_steps_per_call"] == 2 and r["host_copies_per_call"] == 1
