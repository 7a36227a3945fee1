"""`benchmarks/stem_unfolding.py`: its coloured digits are the digits, in three channels that
each show the digit, and its variants unfold the convolutions they name."""

from __future__ import annotations

import pytest
import torch

from benchmarks import stem_unfolding as su
from benchmarks.rescnn_gap import affine_rescnn
from modnorm import data as mn_data
from modnorm.atoms import Conv2d

pytestmark = pytest.mark.usefixtures("restore_torch")  # see conftest


def test_coloured_digits_are_the_digits_in_three_standardized_channels() -> None:
    grey, colour = mn_data.digits(image=True), su.coloured_digits()
    assert colour.x_train is not None and grey.x_train is not None
    assert colour.x_train.shape == (len(grey.x_train), 3, 8, 8)
    assert torch.equal(colour.y_train, grey.y_train) and torch.equal(colour.y_test, grey.y_test)
    assert colour.x_train.mean(0).abs().max() < 1e-4  # standardized per channel and pixel
    # every channel shows the digit: it correlates with the grey image, pixel by pixel
    g = grey.x_train.flatten(1)
    for c in range(3):
        x = colour.x_train[:, c].flatten(1)
        corr = (x * g).mean(0) / (x.std(0) * g.std(0) + 1e-6)
        assert corr[g.std(0) > 0.5].mean() > 0.5


def test_each_variant_unfolds_the_convolutions_it_names() -> None:
    for name, (stem, blocks) in su.VARIANTS.items():
        net = affine_rescnn(8, 2, (stem, blocks), in_channels=3)
        convs = [a for a, _ in net.atom_shares() if isinstance(a, Conv2d)]
        assert [c.unfolded for c in convs] == [stem, blocks, blocks], name
        assert convs[0].weight.shape[1] == 3


def test_a_run_trains_on_coloured_digits() -> None:
    r = su.run(("blocks unfolded", 8, 2, 0, 20, 0))
    assert r["variant"] == "blocks unfolded" and not r["diverged"]
    assert 0 < r["train_loss"] < 2.3  # below chance after 20 steps
