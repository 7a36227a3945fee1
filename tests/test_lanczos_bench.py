"""The check-schedule benchmark (``benchmarks/lanczos_checks.py``): what it counts is what
Lanczos did, and it leaves the library as it found it."""

from __future__ import annotations

import torch

import modnorm.atoms
import modnorm.linalg
from benchmarks import lanczos_checks as lc


def test_counts_copies_and_steps_and_restores_the_library() -> None:
    def library() -> tuple[object, ...]:
        return (
            dict(modnorm.linalg._CHECK_EVERY),
            modnorm.atoms.spectral_norms_batches,
            modnorm.linalg._Workspace.run,
            torch.Tensor.cpu,
        )

    before = library()
    rows = {e: lc.run("resmlp 512x4", e, "cpu", steps=5, warmup=2) for e in (1, 4)}
    assert library() == before
    for every, r in rows.items():
        assert r["check_every"] == every and r["calls"] == 3  # one call for all shapes a step
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


def test_normalize_profile_splits_a_call_into_its_shapes() -> None:
    from benchmarks import normalize_profile as npf

    r = npf.profile_model("resmlp", "cpu", 128, steps=2, quiet=True)
    shapes = {tuple(g["shape"]): g for g in r["groups"]}
    # ResMLP(64 → 10), width 128, 4 blocks: input and head are exact, the blocks iterate
    assert set(shapes) == {(128, 64), (128, 128), (10, 128)}
    assert shapes[(128, 128)]["count"] == 4 and "routes_ms" not in shapes[(128, 128)]
    assert set(shapes[(10, 128)]["routes_ms"]) == {
        "svd", "svdvals", "eigvalsh(gram)", "gram→host eigvalsh"
    }  # fmt: skip
    assert 0 < r["atom_norms_ms"] and 0 < r["normalize_ms"]
