"""``benchmarks/gpu_check.sh``, the script a lent GPU runs, dry-run on the CPU: it only runs
where a GPU is rare, so its flags must not rot in between, and a step that hangs must cost
its time limit, not the lease."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["tests", "sweep", "whole", "stop", "resume", "same", "lanczos", "overhead", "ddp"]
STEPS += ["fsdp", "same"]

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils")


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    gen = torch.Generator().manual_seed(0)
    words = "to be or not that is the question whether tis nobler in mind".split()
    picks = torch.randint(0, len(words), (20000,), generator=gen).tolist()
    (tmp_path / "t.txt").write_text(" ".join(words[i] for i in picks))
    variables = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "DEVICE": "cpu",
        "PY": sys.executable,
        "TEXT": str(tmp_path / "t.txt"),
        "OVERHEAD": "--quick --widths 64",
        "LANCZOS": "--steps 4 --warmup 2",
        "OMP_NUM_THREADS": "1",
        **env,
    }
    script = ROOT / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script)], cwd=ROOT, env=variables, capture_output=True, text=True, timeout=600
    )
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    return done, summary


def test_every_step_passes_on_the_cpu(tmp_path: Path) -> None:
    done, summary = _run(tmp_path)
    verdicts = [line.split()[:2] for line in summary[: len(STEPS)]]
    assert verdicts == [[name, "PASS"] for name in STEPS], done.stdout + done.stderr
    assert done.returncode == 0
    compared = [line for line in summary if "worst relative difference" in line]
    assert [line.split()[0] for line in compared] == ["split", "ddp", "fsdp"]
    assert (tmp_path / "out" / "lanczos_checks_cpu-1t.json").exists()


def test_a_step_past_its_limit_costs_its_limit_and_the_rest_still_report(tmp_path: Path) -> None:
    done, summary = _run(tmp_path, STEP_LIMIT="1", TOTAL_LIMIT="4")
    assert done.returncode == 1
    names = [line.split()[0] for line in summary[: len(STEPS)]]
    assert names == STEPS  # every step reported, none left hanging
    verdicts = {line.split()[1] for line in summary[: len(STEPS)]}
    assert "TIMEOUT" in verdicts and "SKIPPED" in verdicts and "PASS" not in verdicts
