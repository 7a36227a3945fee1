"""The per-method cost benchmark (``benchmarks/overhead.py``): every available method of the
transfer harness timed on the ResMLP and, where it has one, the GPT; missing peers skipped and
reported; the shaping part (normalize, dualize, Modula's normalize, Muon's step) timed inside
every step; optimizer state counted, Modula's moment vectors and wrapped optimizers included."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from benchmarks import overhead as ov
from benchmarks import peers

pytestmark = pytest.mark.usefixtures("restore_torch")  # see conftest


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``--quick`` run (width 32, 1 warm-up + 2 steps) with a method whose package is
    missing; the JSON it wrote."""
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    ghost = peers.Method("ghost", peers.torch_adam, ("resmlp",), ("no_such_package_xyz",))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(peers.METHODS, "ghost", ghost)
        returned = ov.main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(returned["rows"]))
    return saved


def test_every_available_method_is_timed_on_each_model_it_has(quick: dict[str, Any]) -> None:
    available = {n for n, m in peers.METHODS.items() if m.missing() is None}
    assert {"torch-adam", "modnorm-adam", "modnorm-dual"} <= available
    for model in ("resmlp", "gpt"):
        expected = {n for n in available if model in peers.METHODS[n].models}
        got = {r["method"] for r in quick["rows"] if r["model"] == model}
        assert got == expected, model
        assert set(quick["skipped"][model]) == {*peers.METHODS, "ghost"} - expected
    assert "not installed" in quick["skipped"]["resmlp"]["ghost"]
    assert {r["width"] for r in quick["rows"]} == {32}
    assert quick["threads"] == 1 and len(quick["load_average_start"]) == 3


def test_times_are_positive_and_the_shaping_part_lies_inside_the_step(
    quick: dict[str, Any],
) -> None:
    parts = {
        "modnorm-adam": "normalize",
        "modnorm-adam-calibrated": "normalize",
        "modnorm-adam-logits4": "normalize",
        "modnorm-adam-head8": "normalize",
        "modnorm-adam-split": "normalize",
        "modnorm-dual-mixed": "dualize",
        "modnorm-dual-blocks20": "dualize",
        "modnorm-sgd": "normalize",
        "modnorm-dual": "dualize",
        "modula-adam": "modula normalize",
        "muon": "Muon.step",
    }
    for r in quick["rows"]:
        for clock in ("wall", "cpu"):
            assert r["fwd_bwd_ms"][clock] > 0 and math.isfinite(r["fwd_bwd_ms"][clock])
            assert r["step_ms"][clock] > 0
            if r["shaping_ms"] is not None:
                # Timed inside the step, on every step: the median part ≤ the median step.
                assert r["shaping_ms"][clock] <= r["step_ms"][clock]
        assert r["shaping"] == parts.get(r["method"])
        if r["shaping"] is not None:
            assert r["shaping_calls"] == quick["warmup"] + quick["steps"]
        else:
            assert r["shaping_ms"] is None
    muon = [r for r in quick["rows"] if r["method"] == "muon"]
    assert all(set(r["step_ms_by_optimizer"]) == {"AdamW", "Muon"} for r in muon)


def test_optimizer_state_is_counted_where_each_method_keeps_it(quick: dict[str, Any]) -> None:
    for r in quick["rows"]:
        ratio = r["state_bytes"] / r["param_bytes"]
        if r["method"] in ("torch-adam", "modnorm-adam", "modula-adam"):
            # Two moments per weight (Modula's in its own Vectors); torch adds a step counter.
            assert 2 <= ratio < 2.01, r["method"]
        if r["method"] in ("modnorm-sgd", "modnorm-dual"):
            assert ratio == 1, r["method"]  # one momentum buffer per weight
        if r["method"] == "muon":
            assert 1 < ratio < 2  # Muon's momentum for hidden matrices, AdamW's two for the rest
        assert r["cuda_peak_bytes"] is None


def test_the_table_and_verdict_cover_every_row(quick: dict[str, Any]) -> None:
    text = ov.table(quick["rows"])
    assert text.count("\n") == len(quick["rows"]) + 1
    for r in quick["rows"]:
        assert f"| {r['model']} | 32 | {r['method']} |" in text
    verdict = quick["verdict"]
    assert verdict["resmlp/32/modnorm-dual"]["target"] == ov.TARGETS["dualize"]
    assert verdict["resmlp/32/modnorm-adam"]["target"] == ov.TARGETS["normalize"]
    for v in verdict.values():
        assert v["met"] == (v["ratio"] <= v["target"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "nope"], "unknown method"),
        (["--gpt-widths", "30"], "multiples of its 4 heads"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_are_named(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        ov.main(args)
    assert message in capsys.readouterr().err
