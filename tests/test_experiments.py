import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import pytest

from modnorm import experiments as ex


def test_parse_lrs() -> None:
    assert ex.parse_lrs("2^-2:2^1") == [0.25, 0.5, 1.0, 2.0]
    assert ex.parse_lrs("2^-1:2^0:0.5") == pytest.approx([0.5, 2**-0.5, 1.0])
    assert ex.parse_lrs("0.1,0.001,0.01") == [0.001, 0.01, 0.1]
    assert ex.parse_lrs("0.25:1") == [0.25, 0.5, 1.0]
    for bad in ("2^a:2^1", "1:0.5", "0.1,-1", "", "2^-1:2^0:0", "a:b:c:d"):
        with pytest.raises(ValueError, match="cannot read the learning-rate grid"):
            ex.parse_lrs(bad)


def test_best_lr_is_the_middle_of_the_near_ties() -> None:
    lrs = [2.0**k for k in range(-4, 1)]  # 1/16 ... 1
    losses = [1.0, 0.5, 0.300, 0.301, 0.6]  # 1/4 and 1/2 tie within 1 %
    b = ex.best_lr(lrs, losses)
    assert b["lr"] == pytest.approx(2**-1.5)
    assert b["near"] == [0.25, 0.5] and not b["edge"]
    assert ex.best_lr(lrs, [0.1, 0.5, 0.6, 0.7, 0.8])["edge"]  # minimum on the first lr
    none = ex.best_lr(lrs, [math.inf] * 5)
    assert none["lr"] is None and none["edge"]


def _run(opt: str, width: int, lr: float, loss: float, seed: int = 0) -> dict:  # type: ignore[type-arg]
    return {
        "optimizer": opt,
        "width": width,
        "depth": 2,
        "lr": lr,
        "seed": seed,
        "train_loss": loss,
        "diverged": not math.isfinite(loss),
        "wall_time": 1.0,
    }


def test_drift_and_regret_on_a_hand_made_table() -> None:
    lrs = [0.125, 0.25, 0.5, 1.0]
    table = {
        # width 32: best at 0.25; width 128: best at 1.0 (2 octaves away), diverges at nothing
        32: [0.9, 0.40, 0.6, 0.8],
        128: [0.9, 0.70, 0.5, 0.20],
    }
    runs = [
        _run("a", w, lr, loss) for w, ls in table.items() for lr, loss in zip(lrs, ls, strict=True)
    ]
    # a second optimizer whose best stays put, with one divergence and two seeds
    for seed, shift in ((0, 0.0), (1, 0.02)):
        runs += [
            _run("b", 32, lr, loss + shift, seed)
            for lr, loss in zip(lrs, [0.9, 0.3, 0.5, 0.7], strict=True)
        ]
        runs += [
            _run("b", 128, lr, loss + shift, seed)
            for lr, loss in zip(lrs, [0.9, 0.2, 0.4, math.inf], strict=True)
        ]
    s = ex.summarize(runs, "width")
    assert s["a"]["best_lr"] == {"32": 0.25, "128": 1.0}
    assert s["a"]["drift_octaves"] == pytest.approx(2.0)
    # regret: at lr 0.25 width 128 has 0.70 against its best 0.20 → 250 %
    assert s["a"]["regret"] == pytest.approx((0.70 - 0.20) / 0.20)
    assert s["a"]["edge"] == {"32": False, "128": True}
    assert s["a"]["improves_with_scale"]
    assert s["b"]["drift_octaves"] == 0
    assert s["b"]["regret"] == 0
    assert s["b"]["diverged"] == 2
    assert s["b"]["best_loss"]["128"] == pytest.approx(0.21)  # mean over seeds


def test_regret_denominator_has_a_floor() -> None:
    lrs = [0.5, 1.0, 2.0]
    runs = [_run("a", 32, lr, x) for lr, x in zip(lrs, [0.2, 0.1, 0.3], strict=True)]
    runs += [_run("a", 64, lr, x) for lr, x in zip(lrs, [0.2, 0.011, 0.001], strict=True)]
    s = ex.summarize(runs, "width", floor=0.05)
    assert s["a"]["regret"] == pytest.approx((0.011 - 0.001) / 0.05)


def test_regret_between_grid_points_is_read_off_both_neighbours() -> None:
    # The smallest model ties at 0.25 and 0.5, so its best lr is their geometric middle; the
    # loss of the other model there is interpolated in log2(lr), not taken from whichever
    # neighbour a tie-break picks (which made regret depend on the grid's order).
    lrs = [0.125, 0.25, 0.5, 1.0]
    runs = [_run("a", 32, lr, x) for lr, x in zip(lrs, [0.5, 0.3, 0.3, 0.6], strict=True)]
    runs += [_run("a", 64, lr, x) for lr, x in zip(lrs, [0.6, 0.4, 0.2, 0.5], strict=True)]
    s = ex.summarize(runs, "width")
    assert s["a"]["best_lr"]["32"] == pytest.approx(2**-1.5)
    assert s["a"]["regret"] == pytest.approx((0.3 - 0.2) / 0.2)
    # Reversing the 64-wide model's neighbours gives the same regret: no side is favoured.
    runs[-4:] = [_run("a", 64, lr, x) for lr, x in zip(lrs, [0.6, 0.2, 0.4, 0.5], strict=True)]
    assert ex.summarize(runs, "width")["a"]["regret"] == pytest.approx((0.3 - 0.2) / 0.2)


def test_loss_at_interpolates_in_log_lr_and_respects_divergence() -> None:
    curve = {0.25: 1.0, 1.0: 3.0, 4.0: math.inf}
    assert ex.loss_at(curve, 0.5) == pytest.approx(2.0)  # half-way in log2
    assert ex.loss_at(curve, 1.0) == 3.0
    assert ex.loss_at(curve, 0.1) == 1.0  # outside the grid: the nearest end
    assert ex.loss_at(curve, 2.0) == math.inf  # a diverged neighbour


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        ex.SweepConfig(model="vit").validate()
    with pytest.raises(ValueError, match="unknown optimizer"):
        ex.SweepConfig(optimizers=["lion"]).validate()
    with pytest.raises(ValueError, match="needs text data"):
        ex.SweepConfig(model="gpt").validate()


def test_build_model_passes_head_options_to_modnorm_compounds_only() -> None:
    from modnorm import data as mn_data

    data = mn_data.load("digits", input_noise=1.0)
    cfg = ex.SweepConfig(model="resmlp")
    net = ex.build_model(cfg, "modnorm-adam", 32, 2, data, output_scale=2.0, head_mass=4.0)
    shares = [s for _, s in net.atom_shares()]  # type: ignore[operator]
    # input layer, two blocks (mass 1 in all), head (4): shares of 6, halved by the multiplier
    assert shares == pytest.approx([1 / 12, 1 / 12, 1 / 12, 4 / 12])
    for option in ("output_scale", "head_mass"):
        with pytest.raises(ValueError, match=f"{option} is an option of modnorm"):
            ex.build_model(cfg, "adam", 32, 2, data, **{option: 2.0})
        with pytest.raises(ValueError, match=f"{option} is an option of modnorm"):
            ex.build_model(
                ex.SweepConfig(model="mlp"), "modnorm-adam", 32, 2, data, **{option: 2.0}
            )


def test_build_model_gives_modnorm_rescnn_and_gpt_their_affine_atoms(tmp_path: Path) -> None:
    from modnorm import data as mn_data
    from modnorm.atoms import Bias

    def kinds(net: Any) -> list[str]:
        return [type(a).__name__ for a, _ in net.atom_shares()]

    images = mn_data.load("digits", image=True)
    cfg = ex.SweepConfig(model="rescnn", affine_mass=0.25)
    cfg.validate()
    net = ex.build_model(cfg, "modnorm-adam", 8, 2, images)
    plain = ex.build_model(dataclasses.replace(cfg, affine_mass=None), "modnorm-adam", 8, 2, images)
    atoms = kinds(net)
    # a Bias per Conv2d, a Gain and a Bias per RMSDivide, a Bias after the head
    assert atoms.count("Bias") == 3 + 2 + 1 and atoms.count("Gain") == 2
    assert [k for k in atoms if k not in ("Bias", "Gain")] == kinds(plain)
    (head, head_share), (bias, bias_share) = list(net.atom_shares())[-2:]  # type: ignore[operator]
    assert type(head).__name__ == "Linear" and isinstance(bias, Bias)
    assert bias_share == pytest.approx(0.25 * head_share)  # mass 0.25 where a Linear has 1
    torch_net = ex.build_model(cfg, "adam", 8, 2, images)  # torch.nn's own biases, unchanged
    assert sum(p.numel() for p in torch_net.parameters()) == sum(
        p.numel()
        for p in ex.build_model(ex.SweepConfig(model="rescnn"), "adam", 8, 2, images).parameters()
    )
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 20)
    text = mn_data.load(f"text:{corpus}")
    gpt = ex.SweepConfig(model="gpt", data=f"text:{corpus}", num_heads=2, affine_mass=0.5)
    assert "Gain" in kinds(ex.build_model(gpt, "modnorm-dual", 8, 1, text))
    for bad, message in (
        (ex.SweepConfig(affine_mass=0.25), "option of modnorm's rescnn and gpt, not resmlp"),
        (ex.SweepConfig(model="rescnn", affine_mass=math.inf), "finite non-negative number"),
        (ex.SweepConfig(model="rescnn", affine_mass=True), "finite non-negative number"),
        (
            ex.SweepConfig(model="rescnn", optimizers=["adam"], affine_mass=0.25),
            r"none of the optimizers \['adam'\] trains one",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            bad.validate()
    with pytest.raises(ValueError, match="option of modnorm's rescnn and gpt, not resmlp"):
        ex.build_model(ex.SweepConfig(affine_mass=0.25), "modnorm-adam", 8, 2, images)


def test_build_model_unfolds_the_modnorm_rescnns_block_convolutions() -> None:
    from modnorm import data as mn_data
    from modnorm.atoms import Conv2d

    images = mn_data.load("digits", image=True)
    cfg = ex.SweepConfig(model="rescnn", optimizers=["modnorm-dual", "adam"], unfolded=True)
    cfg.validate()
    net = ex.build_model(cfg, "modnorm-dual", 8, 2, images)
    convs = [a for a, _ in net.atom_shares() if isinstance(a, Conv2d)]  # type: ignore[operator]
    assert [c.unfolded for c in convs] == [False, True, True]  # the stem per kernel position
    folded = ex.build_model(dataclasses.replace(cfg, unfolded=False), "modnorm-dual", 8, 2, images)
    assert not any(c.unfolded for c in folded.modules() if isinstance(c, Conv2d))
    torch_net = ex.build_model(cfg, "adam", 8, 2, images)  # a norm: torch.nn's model has none
    assert not any(isinstance(m, Conv2d) for m in torch_net.modules())
    for bad, message in (
        (ex.SweepConfig(unfolded=True), "unfolded is an option of modnorm's rescnn, not resmlp"),
        (ex.SweepConfig(model="rescnn", unfolded=1), "unfolded must be True or False, got 1"),
        (
            ex.SweepConfig(model="rescnn", optimizers=["adam"], unfolded=True),
            r"none of the optimizers \['adam'\] trains one",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            bad.validate()
    with pytest.raises(ValueError, match="unfolded is an option of modnorm's rescnn, not mlp"):
        ex.build_model(ex.SweepConfig(model="mlp", unfolded=True), "modnorm-adam", 8, 2, images)


@pytest.mark.parametrize(("field", "value"), [("affine_mass", 0.25), ("unfolded", True)])
def test_a_saved_sweep_predating_a_field_is_the_same_sweep(
    tmp_path: Path, field: str, value: object
) -> None:
    cfg = ex.SweepConfig(model="rescnn", values=[8], lrs=[0.1], steps=1)
    old = dataclasses.asdict(cfg)
    del old[field]  # as saved before the field existed
    runs = [{"optimizer": "adam", "width": 8}]
    ex.write_json_atomic(tmp_path / "results.json", {"schema": 1, "config": old, "runs": runs})
    assert ex.load_results(tmp_path, cfg) == runs
    with pytest.raises(ValueError, match="different sweep"):
        ex.load_results(tmp_path, dataclasses.replace(cfg, **{field: value}))


def test_a_sweep_over_processes_refuses_what_it_cannot_send(tmp_path) -> None:
    from modnorm.data import digits

    cfg = ex.SweepConfig(values=[8], lrs=[0.1, 0.2], optimizers=["local"], steps=1)

    def local(cfg, data, width, depth, lr, device):  # a closure: spawn cannot pickle it
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'local' cannot be pickled"):
        ex.run_sweep(cfg, tmp_path, digits(), progress=False, builders={"local": local}, jobs=2)
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        ex.run_sweep(cfg, tmp_path, digits(), progress=False, builders={"local": local}, jobs=0)


def test_atomic_results_are_as_readable_as_open_makes_them(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        ex.write_json_atomic(tmp_path / "r.json", {"a": 1})
        (tmp_path / "plain.json").write_text("{}")
    finally:
        os.umask(mask)
    mode = (tmp_path / "r.json").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.json").stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob("*.tmp"))
