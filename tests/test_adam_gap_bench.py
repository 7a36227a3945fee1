"""The loss-gap ablation (``benchmarks/adam_gap.py``): each variant changes one thing of the
network the transfer benchmark trains, and the unchanged one is that network."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import adam_gap as ag
from modnorm import compounds


def test_the_default_variant_is_the_benchmarks_resmlp() -> None:
    torch.manual_seed(0)
    ours = ag.resmlp(48, 3)
    torch.manual_seed(0)
    theirs = compounds.ResMLP(64, 10, 48, 3)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(5, 64)
    assert torch.equal(ours(x), theirs(x))


def test_every_variant_changes_the_network_or_the_optimizer() -> None:
    # the forward pass, the masses (how an update is shared out) or the optimizer
    x = torch.randn(5, 64)
    torch.manual_seed(0)
    base = ag.resmlp(32, 2)
    nominal, shares = base(x), [s for _, s in base.atom_shares()]
    for name, (make_net, make_opt, _) in ag.VARIANTS.items():
        torch.manual_seed(0)
        net = make_net(32, 2)
        out = net(x)
        assert out.shape == (5, 10)
        same_net = torch.equal(out, nominal) and [s for _, s in net.atom_shares()] == shares
        opt = make_opt(net, 0.1)
        default_opt = type(opt) is ag.mn_optim.Adam and opt.defaults["betas"] == (0.9, 0.99)
        assert (name == "modnorm-adam") == (same_net and default_opt), name


def test_one_run_trains() -> None:
    r = ag.run(("plain residuals", 16, 2, -1, ag.STEPS, 0))
    assert r["variant"] == "plain residuals" and r["blocks"] == 2 and not r["diverged"]
    assert 0 < r["train_loss"] < 2.3  # below chance (ln 10) after 200 steps


def test_report_averages_seeds_and_keeps_earlier_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.json"

    def row(k: int, loss: float, **seed: int) -> dict:
        return {"variant": "v", "log2_lr": k, "train_loss": loss, **seed}

    # an earlier file from before seeds: its rows are seed 0
    path.write_text(json.dumps({"rows": [row(-1, 0.30), row(0, 0.20)]}))
    ag.report([row(0, 0.26, seed=1), row(-1, 0.22, seed=1)], ["v"], "t", path)
    out = capsys.readouterr().out
    # means 0.26 at 2^-1 and 0.23 at 2^0: the best is 2^0 (on the grid's edge)
    assert "| v | 2/2 | 2^0* | 0.230 ± 0.042 | 2^-1: 0.260, 2^0: 0.230 |" in out
    rows = json.loads(path.read_text())["rows"]
    keys = sorted((r["log2_lr"], r.get("seed", 0)) for r in rows)
    assert keys == [(-1, 0), (-1, 1), (0, 0), (0, 1)]
    # a rerun of a seed replaces its row, not the others
    ag.report([row(0, 0.10, seed=1)], ["v"], "t", path)
    assert len(json.loads(path.read_text())["rows"]) == 4
    assert "2^0: 0.150" in capsys.readouterr().out


def test_runs_are_saved_as_they_finish(tmp_path: Path) -> None:
    # ablate saves the growing list of finished runs after each one: every save keeps the
    # earlier file's other rows and never repeats a run
    path = tmp_path / "r.json"
    old = {"variant": "v", "log2_lr": 1, "train_loss": 0.5, "seed": 0}
    path.write_text(json.dumps({"rows": [old]}))
    done: list[dict] = []
    for k in (0, -1):
        done.append({"variant": "v", "log2_lr": k, "train_loss": 0.2, "seed": 0})
        ag.save(done, path)
        rows = json.loads(path.read_text())["rows"]
        assert [r["log2_lr"] for r in rows] == sorted([1, *(r["log2_lr"] for r in done)])


def test_resume_skips_the_saved_runs(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    jobs = [("v", 16, 2, k, ag.STEPS, s) for k in (-1, 0, 0.5) for s in (0, 1)]
    assert ag.unsaved(jobs, path) == jobs  # nothing saved yet
    saved = [{"variant": "v", "log2_lr": k, "seed": s} for k, s in ((-1, 0), (0.5, 1))]
    saved.append({"variant": "w", "log2_lr": 0, "seed": 0})  # another variant's run
    saved.append({"variant": "v", "log2_lr": 0})  # from before seeds: seed 0
    saved.append({"variant": "v", "log2_lr": 0.5, "seed": 0, "steps": 1000})  # another budget
    path.write_text(json.dumps({"rows": saved}))
    assert ag.unsaved(jobs, path) == [jobs[1], jobs[3], jobs[4]]
    wider = [("v", 32, 2, -1, ag.STEPS, 0)]
    saved[0]["width"] = 16  # the row records its width: not this job's
    path.write_text(json.dumps({"rows": saved}))
    assert ag.unsaved(wider, path) == wider


def test_lrs_the_table_cannot_tell_apart_are_all_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"variant": "v", "log2_lr": k, "train_loss": loss, "seed": 0}
        for k, loss in ((0, 0.4471), (1, 0.4500), (2, 0.4468))
    ]
    ag.report(rows, ["v"], "t", tmp_path / "r.json")
    # 0.447 at both ends: both shown, on the grid's edge
    assert "| v | 1/1/1 | 2^0 = 2^2* | 0.447 |" in capsys.readouterr().out
    rows[0]["train_loss"] = 0.5  # the best on the edge, tied with 2^1 inside: still "*"
    rows[1]["train_loss"] = 0.4474
    ag.report(rows, ["v"], "t", tmp_path / "r.json")
    assert "| v | 1/1/1 | 2^1 = 2^2* | 0.447 |" in capsys.readouterr().out
    rows[2]["train_loss"] = 0.6  # the best inside: no "*"
    ag.report(rows, ["v"], "t", tmp_path / "r.json")
    assert "| v | 1/1/1 | 2^1 | 0.447 |" in capsys.readouterr().out
    for r in rows:
        r["train_loss"] = math.inf  # all diverged: no lr is tied with "inf"
    ag.report(rows, ["v"], "t", tmp_path / "r.json")
    assert "| v | 1/1/1 | 2^0* | inf |" in capsys.readouterr().out
