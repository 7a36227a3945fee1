"""The learning-rate transfer harness (``benchmarks/transfer.py``): a tiny run of every
available method, missing peers skipped and reported, the peers built as their packages
prescribe, and the README's transfer table equal to the committed results."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import peers
from benchmarks import transfer as tr
from modnorm import experiments as ex
from modnorm.data import digits

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "transfer" / "quick3"
PUBLISHED = COMMITTED.parent / "full"  # the README's table


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    # As the harness runs: two threads that wait on each other on a busy 2-core machine make
    # these tiny runs several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(values: list[int], scale: str = "width") -> tr.Sweep:
    cfg = ex.SweepConfig(
        model="resmlp",
        scale=scale,
        values=values,
        lrs=[2.0**-4, 2.0**-1],
        optimizers=[],
        steps=2,
        batch_size=16,
        input_noise=1.0,
        width=8,
        depth=2,
    )
    return tr.Sweep(f"tiny-{scale}", cfg)


def test_every_available_method_runs_and_missing_ones_are_skipped(tmp_path: Path) -> None:
    logs: list[str] = []
    (r,) = tr.run_suite([_tiny([8, 16])], tmp_path, progress=False, log=logs.append)
    # every method with its package and a ResMLP runs; the rest are skipped, with the reason
    available = {
        n for n, m in peers.METHODS.items() if m.missing() is None and "resmlp" in m.models
    }
    assert set(r["summary"]) == available
    assert set(r["skipped"]) == set(peers.METHODS) - available
    assert {"torch-adam", "modnorm-adam", "modnorm-dual"} <= available  # never optional
    for name in r["skipped"]:
        assert any(f"skipping {name}" in line for line in logs)
    saved = json.loads((tmp_path / "tiny-width" / "results.json").read_text())
    assert len(saved["runs"]) == len(available) * 2 * 2
    assert all(math.isfinite(run["train_loss"]) or run["diverged"] for run in saved["runs"])
    assert (tmp_path / "tiny-width" / "lr.png").stat().st_size > 0
    assert (tmp_path / "tiny-width" / "curves.png").stat().st_size > 0
    table = tr.report([saved])
    assert all(f"| {name} |" in table for name in available)
    # Resuming runs nothing twice.
    logs.clear()
    tr.run_suite([_tiny([8, 16])], tmp_path, progress=False, figures=False, log=logs.append)
    assert any("resuming" in line and "0 to go" in line for line in logs)


def test_runs_spread_over_processes_equal_the_runs_of_one(tmp_path: Path) -> None:
    # --jobs: the same runs, bit for bit, whichever process ran them (wall times aside)
    names = [n for n, m in peers.METHODS.items() if m.missing() is None and "resmlp" in m.models]
    serial, parallel = (
        tr.run_suite([_tiny([8, 16])], tmp_path / str(jobs), names, False, False, jobs=jobs)[0]
        for jobs in (1, 2)
    )

    def key(run: dict) -> tuple:
        return run["optimizer"], run["width"], run["lr"], run["seed"]

    assert len(parallel["runs"]) == len(serial["runs"]) == len(names) * 4
    pairs = zip(sorted(serial["runs"], key=key), sorted(parallel["runs"], key=key), strict=True)
    for a, b in pairs:
        assert {**a, "wall_time": 0} == {**b, "wall_time": 0}
    assert parallel["environment"]["jobs"] == 2


def test_more_seeds_start_from_the_runs_of_a_saved_sweep(tmp_path: Path) -> None:
    # --reuse: a 2-seed sweep starts from a 1-seed sweep's runs and makes only the new ones,
    # which are those a fresh 2-seed sweep makes
    names = ["torch-adam", "modnorm-adam"]
    one = tr.run_suite([_tiny([8, 16])], tmp_path / "one", names, False, False)[0]
    two = replace(_tiny([8, 16]).config, seeds=2)
    logs: list[str] = []
    (reused,) = tr.run_suite([tr.Sweep("tiny-width", two)], tmp_path / "two", ["modnorm-adam"],
                             False, False, log=logs.append, reuse=tmp_path / "one")  # fmt: skip
    assert any("4 runs taken from" in line for line in logs)  # modnorm-adam's seed-0 runs
    assert any("resuming: 4 runs" in line and "4 to go" in line for line in logs)
    (fresh,) = tr.run_suite([tr.Sweep("tiny-width", two)], tmp_path / "fresh", ["modnorm-adam"],
                            False, False)  # fmt: skip

    def runs(r: dict) -> list:
        key = lambda x: (x["width"], x["lr"], x["seed"])  # noqa: E731
        return [{**x, "wall_time": 0, "reused_from": 0} for x in sorted(r["runs"], key=key)]

    assert runs(reused) == runs(fresh)
    source = str(tmp_path / "one" / "tiny-width" / "results.json")
    assert reused["reused_from"] == source
    seed0 = [x for x in one["runs"] if x["optimizer"] == "modnorm-adam"]
    assert [{**x, "reused_from": source} for x in seed0] == [  # taken as saved, and named
        x for x in reused["runs"] if "reused_from" in x
    ]
    assert "reused_from" not in fresh
    # a resume without --reuse still says where the reused runs came from
    (again,) = tr.run_suite([tr.Sweep("tiny-width", two)], tmp_path / "two", ["modnorm-adam"],
                            False, False)  # fmt: skip
    assert again["reused_from"] == source and runs(again) == runs(reused)
    # an output that has runs takes only those it lacks: a method added to a saved sweep
    (mine,) = tr.run_suite([_tiny([8, 16])], tmp_path / "mine", ["torch-adam"], False, False)
    logs.clear()
    (added,) = tr.run_suite([_tiny([8, 16])], tmp_path / "mine", names, False, False,
                            log=logs.append, reuse=tmp_path / "one")  # fmt: skip
    assert any("4 runs taken from" in line for line in logs)
    assert any("resuming: 8 runs" in line and "0 to go" in line for line in logs)
    assert runs(added) == runs(one) and "reused_from" not in mine
    assert [x for x in added["runs"] if x["optimizer"] == "torch-adam"] == mine["runs"]
    logs.clear()
    tr.run_suite([_tiny([8, 16])], tmp_path / "mine", names, False, False, log=logs.append,
                 reuse=tmp_path / "one")  # fmt: skip
    assert any("0 runs taken from" in line for line in logs)
    other = replace(two, steps=3)
    with pytest.raises(ValueError, match="differs in \\['steps'\\]"):
        tr.run_suite([tr.Sweep("tiny-width", other)], tmp_path / "x", ["modnorm-adam"], False,
                     False, reuse=tmp_path / "one")  # fmt: skip


def test_a_larger_grid_starts_from_the_runs_it_shares_with_a_saved_sweep(tmp_path: Path) -> None:
    # --reuse across grids: a sweep over more scales and lrs (the full suite after quick3)
    # takes the saved runs at the scales and lrs they share, and ends equal to a fresh sweep
    small = _tiny([8, 16]).config
    tr.run_suite([tr.Sweep("tiny-width", small)], tmp_path / "small", ["modnorm-adam"], False,
                 False)  # fmt: skip
    big = replace(small, values=[8, 12, 16], lrs=[2.0**-6, *small.lrs])
    logs: list[str] = []
    (reused,) = tr.run_suite([tr.Sweep("tiny-width", big)], tmp_path / "big", ["modnorm-adam"],
                             False, False, log=logs.append, reuse=tmp_path / "small")  # fmt: skip
    assert any("4 runs taken from" in line for line in logs)
    assert any("resuming: 4 runs" in line and "5 to go" in line for line in logs)
    (fresh,) = tr.run_suite([tr.Sweep("tiny-width", big)], tmp_path / "fresh", ["modnorm-adam"],
                            False, False)  # fmt: skip

    def strip(r: dict) -> list:
        key = lambda x: (x["width"], x["lr"], x["seed"])  # noqa: E731
        return [{**x, "wall_time": 0, "reused_from": 0} for x in sorted(r["runs"], key=key)]

    assert strip(reused) == strip(fresh)
    # a smaller grid takes only its own runs
    few = replace(small, values=[16], lrs=[2.0**-1])
    (taken,) = tr.run_suite([tr.Sweep("tiny-width", few)], tmp_path / "few", ["modnorm-adam"],
                            False, False, reuse=tmp_path / "small")  # fmt: skip
    assert [(x["width"], x["lr"]) for x in taken["runs"]] == [(16, 0.5)]


def test_unfinished_sweeps_are_named_with_their_progress(tmp_path: Path) -> None:
    sweep = _tiny([8, 16])
    sweep = tr.Sweep(sweep.name, replace(sweep.config, optimizers=["modnorm-adam"]))
    done = tmp_path / "done"
    tr.run_suite([sweep], done, ["modnorm-adam"], progress=False, figures=False, log=print)
    assert tr.unfinished(done) == []
    saved = json.loads((done / sweep.name / "results.json").read_text())
    ex.write_json_atomic(
        tmp_path / "part" / sweep.name / "results.json",
        {"schema": saved["schema"], "config": saved["config"], "runs": saved["runs"][:3]},
    )
    assert tr.unfinished(tmp_path / "part") == [f"{sweep.name}: unfinished, 3 of 4 runs saved"]
    assert tr.unfinished(tmp_path / "part", {sweep.name}) == tr.unfinished(tmp_path / "part")
    assert tr.unfinished(tmp_path / "part", {"another-sweep"}) == []
    assert tr.load_suite(tmp_path / "part") == []


def test_a_missing_package_is_reported_not_fatal(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    ghost = peers.Method("ghost", peers.torch_adam, ("resmlp",), ("no_such_package_xyz",))
    monkeypatch.setitem(peers.METHODS, "ghost", ghost)
    logs: list[str] = []
    (r,) = tr.run_suite(
        [_tiny([8])],
        tmp_path,
        ["ghost", "torch-adam"],
        progress=False,
        figures=False,
        log=logs.append,
    )
    assert "no_such_package_xyz is not installed" in r["skipped"]["ghost"]
    assert set(r["summary"]) == {"torch-adam"}
    assert any("skipping ghost" in line for line in logs)


def test_methods_without_the_model_or_depth_are_skipped() -> None:
    cnn = tr.Sweep("cnn", replace(_tiny([8]).config, model="rescnn"))
    cfg, skipped = tr.plan(cnn, ["umup-adam", "torch-adam"])
    assert cfg.optimizers == ["torch-adam"] and set(skipped) == {"umup-adam"}
    if peers.METHODS["umup-adam"].missing() is None:
        assert skipped["umup-adam"] == "no rescnn model in this harness"
    cfg, skipped = tr.plan(_tiny([1, 2], "depth"), ["modula-adam"])
    assert cfg.optimizers == [] and set(skipped) == {"modula-adam"}
    if peers.METHODS["modula-adam"].missing() is None:
        assert skipped["modula-adam"] == "needs at least 2 blocks, the sweep has 1"
    with pytest.raises(ValueError, match="unknown method 'adam2'"):
        tr.plan(_tiny([8]), ["adam2"])


def test_a_suite_can_be_narrowed_to_some_sweeps_on_another_grid_or_seeds() -> None:
    suite = [_tiny([8]), _tiny([1, 2], "depth")]
    (only,) = tr.select(suite, "tiny-depth", "2^-2:2^1")
    assert only.name == "tiny-depth" and only.config.lrs == [0.25, 0.5, 1.0, 2.0]
    assert only.config.values == [1, 2] and suite[1].config.lrs == [2.0**-4, 2.0**-1]
    assert tr.select(suite, None, None) == suite
    (three,) = tr.select(suite, "tiny-depth", None, seeds=3)
    assert three.config.seeds == 3 and three.config.lrs == suite[1].config.lrs
    with pytest.raises(ValueError, match="seeds"):
        tr.select(suite, None, None, seeds=0)
    (longer,) = tr.select(suite, "tiny-width", None, steps=10)
    assert longer.config.steps == 10 and suite[0].config.steps == 2
    with pytest.raises(ValueError, match="steps"):
        tr.select(suite, None, None, steps=0)
    with pytest.raises(ValueError, match=r"unknown sweep\(s\) \['gpt-width'\]"):
        tr.select(suite, "gpt-width", None)


def test_modnorm_methods_go_through_the_shared_loop_unchanged() -> None:
    cfg, data = _tiny([8]).config, digits(input_noise=1.0)
    plain = ex.train_one(cfg, data, "modnorm-adam", 8, 2, 0.25, 0)
    built = ex.train_one(
        cfg, data, "modnorm-adam", 8, 2, 0.25, 0, build=peers.METHODS["modnorm-adam"].build
    )
    assert plain["curve"] == built["curve"]


def test_the_affine_method_is_modnorm_adam_on_the_affine_compound() -> None:
    cfg = replace(_tiny([8]).config, model="rescnn", input_noise=0.0)
    data = digits(image=True)
    affine = peers.METHODS["modnorm-adam-affine"]
    assert affine.models == ("rescnn",)  # its mass was found on the ResCNN
    built = ex.train_one(cfg, data, "modnorm-adam-affine", 8, 2, 0.25, 0, build=affine.build)
    plain = ex.train_one(replace(cfg, affine_mass=0.25), data, "modnorm-adam", 8, 2, 0.25, 0)
    assert built["curve"] == plain["curve"]
    assert built["curve"] != ex.train_one(cfg, data, "modnorm-adam", 8, 2, 0.25, 0)["curve"]


def test_the_unfolded_methods_are_modnorm_dual_on_the_unfolded_compound() -> None:
    from modnorm.atoms import Conv2d

    cfg = replace(_tiny([8]).config, model="rescnn", input_noise=0.0)
    data = digits(image=True)
    blocks = peers.METHODS["modnorm-dual-unfolded"]
    built = ex.train_one(cfg, data, "modnorm-dual-unfolded", 8, 2, 0.5, 0, build=blocks.build)
    plain = replace(cfg, affine_mass=0.25, unfolded=True)
    assert built["curve"] == ex.train_one(plain, data, "modnorm-dual", 8, 2, 0.5, 0)["curve"]
    net, _ = blocks.build(cfg, data, 8, 2, 0.5, "cpu")
    assert [c.unfolded for c in net.modules() if isinstance(c, Conv2d)] == [False, True, True]
    every = peers.METHODS["modnorm-dual-unfolded-all"]
    net, _ = every.build(cfg, data, 8, 2, 0.5, "cpu")
    assert [c.unfolded for c in net.modules() if isinstance(c, Conv2d)] == [True, True, True]
    with pytest.raises(ValueError, match="one-channel images in ten classes"):
        every.build(replace(cfg, model="resmlp"), digits(), 8, 2, 0.5, "cpu")


def test_seed_spread_is_the_standard_deviation_at_the_best_lr() -> None:
    def run(lr: float, seed: int, loss: float) -> dict[str, object]:
        return dict(optimizer="a", width=8, lr=lr, seed=seed, train_loss=loss, diverged=False,
                    wall_time=0.0)  # fmt: skip

    runs = [run(0.1, 0, 1.0), run(0.1, 1, 1.2), run(1.0, 0, 3.0), run(1.0, 1, 9.0)]
    summary = ex.summarize(runs, "width")
    assert tr.seed_spread(runs, "width", summary) == {"a": pytest.approx(0.02**0.5)}
    assert tr.seed_spread(runs[::2], "width", ex.summarize(runs[::2], "width")) == {"a": None}


def test_mup_uses_the_smallest_width_as_base() -> None:
    pytest.importorskip("mup")
    cfg, data = _tiny([8, 32]).config, digits()
    model, (opt,) = peers.mup_adam(cfg, data, 32, 2, 0.1, "cpu")
    assert model[-1].width_mult() == 4  # type: ignore[index]
    lrs = {g["lr"] for g in opt.param_groups}
    assert lrs == {0.1, 0.1 / 4}  # vector-like at full lr, hidden matrices at lr / width_mult


def test_umup_scales_block_learning_rates_by_width_and_depth() -> None:
    pytest.importorskip("unit_scaling")
    cfg, data = _tiny([16]).config, digits()
    model, (opt,) = peers.umup_adam(cfg, data, 16, 4, 1.0, "cpu")
    by_param = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    block = model.blocks[0].linear.weight  # type: ignore[index, union-attr]
    assert by_param[id(block)] == pytest.approx(16**-0.5 * 4**-0.5)
    assert by_param[id(model.head.weight)] == pytest.approx(1.0)  # type: ignore[union-attr]


def test_muon_gets_only_hidden_matrices() -> None:
    if peers.METHODS["muon"].missing():
        pytest.skip("no torch.optim.Muon")
    cfg, data = _tiny([16]).config, digits()
    model, (adamw, muon) = peers.muon(cfg, data, 16, 3, 0.01, "cpu")
    shapes = [tuple(p.shape) for g in muon.param_groups for p in g["params"]]
    assert shapes == [(16, 16)] * 3
    n = sum(1 for g in adamw.param_groups for _ in g["params"])
    assert n + len(shapes) == len(list(model.parameters()))


def test_muon_on_the_rescnn_trains_hidden_convolutions_as_matrices() -> None:
    if peers.METHODS["muon"].missing():
        pytest.skip("no torch.optim.Muon")
    cfg = replace(_tiny([8]).config, model="rescnn")
    data = digits(image=True)
    torch.manual_seed(0)
    plain = ex.build_model(cfg, "adam", 8, 3, data)
    torch.manual_seed(0)
    model, (adamw, muon) = peers.muon(cfg, data, 8, 3, 0.01, "cpu")
    x = data.x_train[:4]
    torch.testing.assert_close(model(x), plain(x))  # the same network and initialization
    shapes = [tuple(p.shape) for g in muon.param_groups for p in g["params"]]
    assert shapes == [(8, 8 * 3 * 3)] * 3  # the blocks' kernels; not the stem's, not the head
    n = sum(1 for g in adamw.param_groups for _ in g["params"])
    assert n + len(shapes) == len(list(model.parameters()))
    loss = torch.nn.functional.cross_entropy(model(x), data.y_train[:4])
    loss.backward()
    before = [p.detach().clone() for g in muon.param_groups for p in g["params"]]
    muon.step()
    after = [p.detach() for g in muon.param_groups for p in g["params"]]
    # Muon's step on each kernel matrix is orthogonalized: its singular values are about
    # equal (Newton–Schulz leaves them in roughly [0.7, 1.2] times one value)
    for b, a in zip(before, after, strict=True):
        s = torch.linalg.svdvals(a - b)
        assert float(s.min() / s.max()) > 0.5


def test_modula_adam_steps_have_the_reference_norm() -> None:
    pytest.importorskip("modula")
    cfg, data = _tiny([16]).config, digits()
    model, (opt,) = peers.modula_adam(cfg, data, 16, 2, 0.5, "cpu")
    x, y = data.x_train[:32], data.y_train[:32]
    head = list(model.parameters())[-1]
    assert head.shape == (10, 16)
    before = head.detach().clone()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    # The head's share of a step of modular norm 0.5 in Modula's ResMLP (three parts of mass
    # 1) is 0.5 / 3. Modula estimates the spectral norm with one power-iteration step, which
    # can only underestimate it, so the step is at least that large (and not wildly more).
    sigma = float(torch.linalg.matrix_norm(head.detach() - before, ord=2))
    assert 0.5 / 3 * 0.999 <= sigma <= 2 * 0.5 / 3


# ---- the README's table against the committed JSON ---------------------------------------------


def _readme_table() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Transfer benchmarks\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "README has no '## Transfer benchmarks' section"
    rows = [line for line in m.group(1).splitlines() if line.startswith("| ")]
    return [[c.strip() for c in r.strip().strip("|").split(" | ")] for r in rows if "---" not in r]


def test_readme_transfer_table_matches_the_committed_json() -> None:
    # the published grid's overview (python -m benchmarks.transfer --suite full --table)
    results = tr.load_suite(PUBLISHED)
    assert results, f"no committed results under {PUBLISHED}"
    header, *rows = _readme_table()
    want_header, want_rows = tr.overview(results)
    assert header == want_header and rows == want_rows
    _read_back(results, header, rows)  # the numbers in the README are the JSON's


def _read_back(results: list[dict], header: list[str], rows: list[list[str]]) -> None:
    """Every cell of an overview table against its sweep's summary."""
    by_sweep = {r["sweep"]: r for r in results}
    for row in rows:
        for column, cell in zip(header[1:], row[1:], strict=True):
            r = by_sweep[column.split(" ")[0]]
            if cell == "—":
                assert row[0] not in r["summary"]
                continue
            s = r["summary"][row[0]]
            drift, regret, loss = cell.split(" / ")
            assert float(drift) == pytest.approx(s["drift_octaves"], abs=0.05)
            if regret == "∞":  # the small model's lr diverged at some scale
                assert s["regret"] == math.inf
            else:
                assert float(regret.removesuffix(" %")) == pytest.approx(
                    100 * s["regret"], abs=0.05
                )
            best = s["best_loss"].get(str(max(r["config"]["values"])), math.inf)
            if loss == "—":  # every run at the largest scale diverged
                assert not math.isfinite(best)
            else:
                assert float(loss) == pytest.approx(best, abs=5e-4)


def test_the_overview_has_a_column_per_sweep_read_off_its_summary() -> None:
    results = tr.load_suite(COMMITTED)
    header, rows = tr.overview(results)
    assert header == ["method", "resmlp-width 32 → 256", "resmlp-depth 2 → 32"]
    assert [r[0] for r in rows] == [m for m in tr.METHODS if m in results[0]["summary"]]
    _read_back(results, header, rows)
    partial = [results[0], {**results[1], "summary": {"muon": results[1]["summary"]["muon"]}}]
    _, rows = tr.overview(partial)
    assert all(row[2] == "—" for row in rows if row[0] != "muon")  # not run in that sweep


def test_committed_summaries_are_those_of_their_runs() -> None:
    # A change to the metrics (e.g. how regret reads between grid points) must be followed by
    # re-summarizing the committed sweeps: `python -m benchmarks.transfer --suite quick`.
    for out in (COMMITTED, COMMITTED.parent / "wide"):
        for r in tr.load_suite(out):
            fresh = ex.summarize(r["runs"], r["config"]["scale"])
            assert json.loads(json.dumps(fresh)) == r["summary"], r["sweep"]


def test_the_docs_results_page_is_generated_from_the_committed_json(tmp_path: Path) -> None:
    text = tr.DOCS_PAGE.read_text()
    assert text == tr.refresh_page(text), "run: python -m benchmarks.transfer --refresh-docs"
    blocks = re.findall(r"<!-- results: (\S+) -->", text)
    assert "benchmarks/results/transfer/quick" in blocks and len(blocks) >= 4
    stale = text.replace(
        "| modnorm-adam | 2^-1, 2^-1 | 0.0 |", "| modnorm-adam | 2^-2, 2^-1 | 0.5 |"
    )
    assert stale != text and tr.refresh_page(stale) == text  # a hand edit does not survive
    missing = "<!-- results: benchmarks/results/none -->\n<!-- end results -->"
    with pytest.raises(FileNotFoundError, match="no results under benchmarks/results/none"):
        tr.refresh_page(missing)
