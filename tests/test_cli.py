"""Smoke tests of the ``modnorm`` command with tiny settings."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from modnorm import cli
from modnorm import experiments as ex

PNG = b"\x89PNG\r\n\x1a\n"
TINY = [
    "--values",
    "8,16",
    "--lrs",
    "2^-4:2^-3",
    "--steps",
    "5",
    "--batch-size",
    "8",
    "--no-progress",
]


def test_sweep_writes_results_plot_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--model",
        "resmlp",
        "--optimizers",
        "modnorm-adam,adam",
        "--out",
        str(out),
        *TINY,
    ]
    assert cli.main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == 1 and len(res["runs"]) == 2 * 2 * 2
    for r in res["runs"]:
        assert {
            "train_loss",
            "val_loss",
            "accuracy",
            "wall_time",
            "diverged",
            "lr",
            "width",
        } <= set(r)
        assert r["device"] == "cpu"
    assert set(res["summary"]) == {"modnorm-adam", "adam"}
    assert set(res["summary"]["adam"]) >= {
        "best_lr",
        "drift_octaves",
        "regret",
        "edge",
        "improves_with_scale",
    }
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    assert (out / "curves.png").read_bytes()[:8] == PNG
    assert "drift (octaves)" in capsys.readouterr().out

    # an interrupted sweep: drop two runs; the rerun trains only those, here two at a time in
    # two processes, to the same results
    kept = res["runs"][:-2]
    ex.write_json_atomic(out / "results.json", {"schema": 1, "config": res["config"], "runs": kept})
    assert cli.main([*args, "--jobs", "2"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert len(again["runs"]) == 8
    assert again["runs"][:-2] == kept  # finished runs untouched, not redone

    def key(r: dict) -> tuple:
        return r["optimizer"], r["width"], r["lr"]

    redone = sorted(again["runs"][-2:], key=key)
    for a, b in zip(redone, sorted(res["runs"][-2:], key=key), strict=True):
        assert {**a, "wall_time": 0} == {**b, "wall_time": 0}
    assert "6 runs already" in capsys.readouterr().out


def test_a_sweep_on_a_larger_grid_extends_the_saved_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    base = ["sweep", "--out", str(out), "--steps", "5", "--batch-size", "8", "--values", "8"]
    assert cli.main([*base, "--optimizers", "adam", "--lrs", "2^-4:2^-3"]) == 0
    small = json.loads((out / "results.json").read_text())["runs"]
    grown = [*base, "--optimizers", "adam,sgd", "--lrs", "2^-4:2^-2"]
    assert cli.main(grown) == 0
    assert "2 runs already" in capsys.readouterr().out  # adam at 2^-4, 2^-3 were not redone
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 3 and runs[:2] == small
    assert cli.main(["sweep", "--out", str(tmp_path / "fresh"), *grown[3:]]) == 0
    fresh = json.loads((tmp_path / "fresh" / "results.json").read_text())["runs"]

    def key(r: dict) -> tuple:  # type: ignore[type-arg]
        return r["optimizer"], r["lr"]

    for a, b in zip(sorted(runs, key=key), sorted(fresh, key=key), strict=True):
        assert {**a, "wall_time": 0} == {**b, "wall_time": 0}  # as if run on one grid
    # a grid that leaves out a saved lr, or another budget, is not an extension
    for other in (["--lrs", "2^-3:2^-2"], ["--lrs", "2^-4:2^-2", "--steps", "6"]):
        assert cli.main([*base, "--optimizers", "adam,sgd", *other]) == 2
        assert "different sweep" in capsys.readouterr().err


def test_sweep_refuses_a_directory_of_another_sweep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "s"
    assert cli.main(["sweep", "--out", str(out), "--optimizers", "adam", *TINY]) == 0
    before = (out / "results.json").read_bytes()
    code = cli.main(["sweep", "--out", str(out), "--optimizers", "sgd", *TINY])
    assert code == 2
    assert "different sweep" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--out", "x", "--model", "vit"], "invalid choice"),
        (["sweep", "--out", "x", "--lrs", "fast"], "cannot read the learning-rate grid"),
        (["sweep", "--out", "x", "--values", "a,b"], "comma-separated integers"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_optimizer_and_missing_data_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["sweep", "--out", str(tmp_path / "a"), "--optimizers", "lion", *TINY]) == 2
    assert "unknown optimizer 'lion'" in capsys.readouterr().err
    missing = tmp_path / "nope.txt"
    argv = ["train", "--data", f"text:{missing}", "--out", str(tmp_path / "t"), "--no-progress"]
    assert cli.main(argv) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    argv = ["sweep", "--out", str(tmp_path / "a"), "--affine-mass", "0.25", *TINY]
    assert cli.main(argv) == 2  # the ResMLP has no biases or gains to weigh
    assert "affine_mass is an option of modnorm's rescnn and gpt, not resmlp" in (
        capsys.readouterr().err
    )
    argv = ["sweep", "--out", str(tmp_path / "a"), "--model", "rescnn", "--affine-mass", "-1"]
    assert cli.main([*argv, *TINY]) == 2
    assert "affine_mass must be a finite non-negative number, got -1.0" in capsys.readouterr().err
    assert cli.main(["sweep", "--out", str(tmp_path / "a"), "--unfolded", *TINY]) == 2
    assert "unfolded is an option of modnorm's rescnn, not resmlp" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question.\n" * 40)
    return path


def test_train_checkpoints_and_resumes_exactly(tmp_path: Path) -> None:
    from modnorm.data import text

    corpus = _corpus(tmp_path)
    cfg = ex.TrainConfig(
        model="gpt",
        data=f"text:{corpus}",
        width=16,
        depth=1,
        num_heads=2,
        context=8,
        steps=8,
        batch_size=4,
        eval_every=4,
        checkpoint_every=3,
        weight_decay=0.01,
    )
    data = text(corpus)
    full = ex.train(cfg, tmp_path / "full", data, progress=False)
    ex.train(cfg, tmp_path / "part", data, progress=False, stop_after=5)  # "killed" after step 5
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["step"] == 5
    plain = tmp_path / "plain"
    plain.write_text("")  # a checkpoint is as readable as a file open() makes (not 0600)
    assert (tmp_path / "part" / "checkpoint.pt").stat().st_mode == plain.stat().st_mode
    resumed = ex.train(cfg, tmp_path / "part", data, resume=True, progress=False)
    assert resumed["train_curve"] == full["train_curve"]  # bit-for-bit the same run
    assert resumed["val"] == full["val"]
    with pytest.raises(ValueError, match="exists"):
        ex.train(cfg, tmp_path / "full", data, progress=False)


def test_a_checkpoint_resumes_across_a_new_config_field_at_its_default(tmp_path: Path) -> None:
    from modnorm.data import text

    corpus = _corpus(tmp_path)
    common = dict(model="gpt", data=f"text:{corpus}", width=16, depth=1, num_heads=2, context=8)
    cfg = ex.TrainConfig(**common, steps=4, batch_size=2, eval_every=2, checkpoint_every=2)
    data = text(corpus)
    ex.train(cfg, tmp_path / "old", data, progress=False, stop_after=2)
    path = tmp_path / "old" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    del ckpt["config"]["affine_mass"], ckpt["config"]["unfolded"]  # saved before they existed
    torch.save(ckpt, path)
    assert ex.train(cfg, tmp_path / "old", data, resume=True, progress=False)["steps_done"] == 4
    affine = dataclasses.replace(cfg, affine_mass=0.25)
    ex.train(affine, tmp_path / "affine", data, progress=False, stop_after=2)
    with pytest.raises(ValueError, match="different configuration"):
        ex.train(cfg, tmp_path / "affine", data, resume=True, progress=False)


def test_train_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = _corpus(tmp_path)
    argv = [
        "train", "--data", f"text:{corpus}", "--width", "16", "--depth", "1", "--heads", "2",
        "--context", "8", "--steps", "4", "--batch-size", "2", "--eval-every", "2",
        "--out", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "validation loss" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "train.json").read_text())
    assert saved["steps_done"] == 4 and len(saved["val"]) == 2
    argv = [
        "train", "--model", "rescnn", "--data", "digits", "--optimizer", "modnorm-dual",
        "--unfolded", "--width", "4", "--depth", "1", "--steps", "2", "--batch-size", "8",
        "--out", str(tmp_path / "cnn"), "--no-progress",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    ckpt = torch.load(tmp_path / "cnn" / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["unfolded"] is True  # build_model's test: it reaches the ResCNN


def test_plot_and_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = {"widths": [8, 16], "depths": [1, 2], "lrs": "2^-3:2^-2", "steps": 4}
    monkeypatch.setattr(cli, "DEMO_QUICK", tiny)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert (out / "demo.png").read_bytes()[:8] == PNG
    assert "| modnorm-adam |" in (out / "table.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert [s["config"]["scale"] for s in saved["sweeps"]] == ["width", "depth"]
    assert cli.main(["plot", str(out / "width"), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG
    assert (
        cli.main(["plot", str(out), "--out", str(tmp_path / "q.png"), "--metric", "val_loss"]) == 0
    )
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


def test_python_dash_m_modnorm_is_the_command() -> None:
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "modnorm", "sweep", "--out", "x", "--values", "a,b"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "comma-separated integers" in run.stderr
    assert run.stderr.startswith("usage: modnorm sweep")
