"""The GPT loss-gap ablation (``benchmarks/gpt_gap.py``): Muon's split of modnorm's GPT, the
variants' networks, and one short run."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import adam_gap as ag
from benchmarks import gpt_gap as gg
from modnorm import experiments as ex
from modnorm.atoms import Bias, Embedding, Gain, Linear


class _Vocab:
    num_classes = 11


def test_muon_gets_the_hidden_matrices_of_modnorms_gpt() -> None:
    net, (adamw, muon) = gg.muon_on_modnorm_gpt(gg.CONFIG, _Vocab(), 32, 2, 0.01, "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    groups = [[p for g in o.param_groups for p in g["params"]] for o in (adamw, muon)]
    ids = [{id(p) for p in g} for g in groups]
    assert not ids[0] & ids[1] and ids[0] | ids[1] == {id(p) for p in net.parameters()}
    atoms = [a for a, _ in net.atom_shares()]
    head = atoms[-1]
    assert isinstance(head, Linear) and id(head.weight) in ids[0]
    assert {id(a.weight) for a in atoms if isinstance(a, Embedding)} <= ids[0]
    assert len(groups[1]) == 2 * (4 + 2)  # per block: q, k, v, out and the MLP's two


def test_without_biases_or_gains_only_the_matrices_and_embeddings_train() -> None:
    model, (adamw, muon) = gg.muon_without_biases_or_gains(gg.CONFIG, _Vocab(), 32, 2, 0.01, "cpu")
    trained = {id(p) for o in (adamw, muon) for g in o.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in trained) == (p.ndim == 2), name
        if p.ndim == 1:
            assert not p.requires_grad and float(p.abs().max()) in (0.0, 1.0), name


def test_modnorms_init_makes_rms_preserving_matrices_and_unit_rows() -> None:
    model, _ = gg.muon_with_modnorms_init(gg.CONFIG, _Vocab(), 32, 2, 0.01, "cpu")
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            s = torch.linalg.svdvals(m.weight)
            want = (m.out_features / m.in_features) ** 0.5
            assert torch.allclose(s[: min(m.weight.shape)], torch.full_like(s, want), rtol=1e-4)
        elif isinstance(m, torch.nn.Embedding):
            rms = m.weight.square().mean(1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), rtol=1e-5)


def test_the_default_variants_are_the_benchmarks_gpt() -> None:
    cfg, data = gg.CONFIG, _Vocab()
    torch.manual_seed(0)
    theirs = ex.build_model(cfg, "modnorm-dual", 32, 2, data)  # type: ignore[arg-type]
    x = torch.randint(0, 11, (2, 16))
    for name in ("modnorm-dual", "modnorm-adam", "modnorm-dual with blocks mass 20"):
        torch.manual_seed(0)
        net, _ = gg.VARIANTS[name][0](cfg, data, 32, 2, 0.1, "cpu")
        assert torch.equal(net(x), theirs(x))
        same_shares = [s for _, s in net.atom_shares()] == [s for _, s in theirs.atom_shares()]
        assert same_shares == (name != "modnorm-dual with blocks mass 20")


def test_the_hand_built_gpt_is_modnorms_and_each_option_changes_it() -> None:
    torch.manual_seed(0)
    ours = gg.gpt(11, 16, 32, 4, 2)
    torch.manual_seed(0)
    theirs = gg.compounds.GPT(11, 16, 32, 4, 2)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    x = torch.randint(0, 11, (2, 16))
    assert torch.equal(ours(x), theirs(x))
    assert [s for _, s in ours.atom_shares()] == [s for _, s in theirs.atom_shares()]
    options = (
        {"residual": "plain"},
        {"embed": "sum"},
        {"attention": "1/sqrt(d)"},
        {"qkv_scale": 1.0},
    )
    for option in options:
        torch.manual_seed(0)
        other = gg.gpt(11, 16, 32, 4, 2, **option)
        assert not torch.allclose(other(x), theirs(x)), option


def test_one_run_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "abc.txt"
    text.write_text("the cat sat on the mat. " * 400)
    monkeypatch.setattr(gg, "CONFIG", replace(gg.CONFIG, data=f"text:{text}", steps=30))
    r = gg.run(("modnorm-dual", 16, 1, -1, gg.CONFIG.steps, 0))
    assert r["variant"] == "modnorm-dual" and r["blocks"] == 1 and not r["diverged"]
    assert 0 < r["train_loss"] < 2.0  # a repeated sentence of 10 characters: below chance


def test_variant_names_can_be_given_on_the_command_line() -> None:
    # --variants is comma-separated
    assert not [n for n in (*gg.VARIANTS, *ag.VARIANTS) if "," in n]


@pytest.mark.parametrize("mass", [1.0, 0.25, 0.05])
def test_the_affine_variants_add_biases_and_gains_of_their_mass(mass: float) -> None:
    cfg, data = gg.CONFIG, _Vocab()
    torch.manual_seed(0)
    plain, _ = gg.VARIANTS["modnorm-dual"][0](cfg, data, 32, 2, 0.1, "cpu")
    torch.manual_seed(0)
    net, (opt,) = gg.VARIANTS[f"modnorm-dual with biases and gains of mass {mass:g}"][0](
        cfg, data, 32, 2, 0.1, "cpu"
    )
    atoms = [a for a, _ in net.atom_shares()]
    # per block: 5 biases on Linears (the keys have none) and 2 LayerNorms' gains and biases
    assert sum(isinstance(a, (Bias, Gain)) for a in atoms) == 2 * (5 + 4) + 1 + 2
    # the mass is relative to a Linear's (the blocks and the head are tared as a whole): each
    # Linear's bias, and the final LayerNorm's gain and bias (outside any tare)
    pairs = [(a, b) for a, b in itertools.pairwise(atoms) if isinstance(a, Linear)]
    assert sum(isinstance(b, Bias) for _, b in pairs) == 2 * 5 + 1
    pairs = [(a, b) for a, b in pairs if isinstance(b, Bias)]
    assert [b.mass / a.mass for a, b in pairs] == pytest.approx([mass] * len(pairs))
    assert atoms[-4].mass == atoms[-3].mass == mass  # the final LayerNorm's gain and bias
    assert isinstance(opt, gg.mn_optim.Dual)
    x = torch.randint(0, 11, (2, 16))
    torch.testing.assert_close(net(x), plain(x))  # biases at 0 and gains at 1: the same start


@pytest.mark.parametrize(
    ("held", "moving"), [("(gains held at 1)", Bias), ("(biases held at 0)", Gain)]
)
def test_the_half_affine_variants_hold_one_kind_of_vector_atom(held: str, moving: type) -> None:
    (name,) = [n for n in gg.VARIANTS if n.endswith(held)]
    net, _ = gg.VARIANTS[name][0](gg.CONFIG, _Vocab(), 32, 2, 0.1, "cpu")
    for atom, share in net.atom_shares():
        if isinstance(atom, (Bias, Gain)):
            assert (share > 0) == isinstance(atom, moving), (name, atom)
