"""modnorm.parallel: PyTorch's tensor-parallel styles for modnorm's atoms (the four-rank
training runs are in test_distributed.py)."""

from __future__ import annotations

import re

import pytest
import torch.distributed as dist

import modnorm as mn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


@pytest.mark.parametrize(
    ("style", "module"),
    [
        *(
            (style, module)
            for style in ("ColwiseParallel", "RowwiseParallel")
            for module in (mn.Conv2d(3, 4, 3), mn.GELU())
        ),
        ("RowwiseParallel", mn.Bias(4)),  # a vector is cut only with the features before it
        ("RowwiseParallel", mn.Gain(4)),
    ],
)
def test_a_style_names_what_it_cannot_cut(style: str, module: mn.Module) -> None:
    import modnorm.parallel as parallel

    what = re.escape(module._name())
    with pytest.raises(ValueError, match=f"{style} shards a modnorm Linear.*, not {what}"):
        getattr(parallel, style)()._apply(module, None)


def test_a_channel_bias_is_not_cut_as_features() -> None:
    import modnorm.parallel as parallel

    with pytest.raises(ValueError, match=r"last dimension, not Bias\(4, dim=1\)"):
        parallel.ColwiseParallel()._apply(mn.Bias(4, dim=1), None)


def test_megatron_plan_cuts_attention_by_heads_and_mlps_by_rows_then_columns() -> None:
    from modnorm.parallel import ColwiseParallel, RowwiseParallel, megatron_plan

    net = mn.GPT(11, 8, 16, 4, 2)
    atoms = {name for name, m in net.named_modules() if isinstance(m, mn.Linear)}
    plan = {name: type(style) for name, style in megatron_plan(net).items()}
    # every hidden Linear, each block's q, k, v and MLP input by rows, outputs by columns
    assert set(plan) == atoms - {max(atoms, key=lambda n: int(n.split(".")[0]))}  # not the head
    cut = [dict(net.named_modules())[n] for n in plan]
    rows = [m.out_features for m, s in zip(cut, plan.values(), strict=True) if s is ColwiseParallel]
    assert sorted(rows) == sorted([16] * 6 + [64] * 2)  # 3 × 2 q/k/v, 2 MLP inputs
    assert list(plan.values()).count(RowwiseParallel) == 4  # 2 attention outputs, 2 MLP outputs
    mlp = mn.Linear(32, 5) @ mn.GELU() @ mn.Linear(16, 32) @ mn.GELU() @ mn.Linear(12, 16)
    assert {n: type(s) for n, s in megatron_plan(mlp).items()} == {
        "0": ColwiseParallel,
        "2": RowwiseParallel,
    }
    assert megatron_plan(mn.ResMLP(12, 5, width=16, num_blocks=2)) == {}  # no pairs to cut
    # with biases: those after a row-cut Linear go with it (q and v, the MLP's input), those
    # after a column-cut one (summed outputs, whole on every rank) and the LayerNorms' stay
    affine = mn.GPT(11, 8, 16, 4, 1, affine_mass=0.1)
    modules = dict(affine.named_modules())
    plan = {name: type(style) for name, style in megatron_plan(affine).items()}
    assert sorted(type(modules[n]).__name__ for n in plan) == sorted(["Linear"] * 6 + ["Bias"] * 3)
    rowwise = [modules[n].in_features for n, s in plan.items() if s is RowwiseParallel]
    assert sorted(rowwise) == [16, 64]  # the attention's output, the MLP's output
    names = list(plan)
    for i, n in enumerate(names):  # each cut Bias right after a Linear cut by rows
        if type(modules[n]) is mn.Bias:
            before = names[i - 1]
            assert type(modules[before]) is mn.Linear and plan[before] is ColwiseParallel
            assert modules[before].out_features == modules[n].out_features


def test_sequence_parallel_cuts_the_stream_between_the_blocks_along_the_positions() -> None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, PrepareModuleOutput

    from modnorm.parallel import ColwiseParallel, RowwiseParallel, megatron_plan

    net = mn.GPT(11, 8, 16, 4, 2)
    plain, plan = megatron_plan(net), megatron_plan(net, sequence_parallel=True)
    # the same cuts; the cut Linears read the stream cut by positions and write back into it
    cuts = {n: s for n, s in plan.items() if isinstance(s, (ColwiseParallel, RowwiseParallel))}
    assert set(cuts) == set(plain)
    for style in cuts.values():
        if isinstance(style, ColwiseParallel):
            assert style.input_layouts == (Shard(1),)
        else:
            assert style.output_layouts == (Shard(1),)
    # sliced where it enters the first block (a residual tuple), gathered after the last
    # one's merge, the Add before the final LayerNorm
    top = [n for n, _ in net.named_children()]
    enter, leave = (n for n in plan if n not in cuts)
    assert isinstance(plan[enter], PrepareModuleInput) and enter == top[2]
    assert plan[enter].desired_input_layouts == (Shard(1),)
    assert isinstance(plan[leave], PrepareModuleOutput) and leave == top[2 + 4 * 2 - 1]
    assert plan[leave].desired_output_layouts == (Replicate(),)
    # an atom in the blocks that is not cut would train on one rank's positions: refused
    with pytest.raises(ValueError, match=r"Gain.*not cut with the features"):
        megatron_plan(mn.GPT(11, 8, 16, 4, 1, affine_mass=0.1), sequence_parallel=True)
    mlp = mn.Linear(32, 5) @ mn.GELU() @ mn.Linear(16, 32)
    with pytest.raises(ValueError, match="inside blocks"):
        megatron_plan(mlp, sequence_parallel=True)
