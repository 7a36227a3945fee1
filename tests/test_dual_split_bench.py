"""The dual-map split benchmark (``benchmarks/dual_split.py``): it prints the whole network's
dual-map time and each rank's share of it."""

from __future__ import annotations

import re
import sys

import pytest

from benchmarks import dual_split


def test_each_ranks_share_is_printed_and_the_shares_cover_the_whole(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["dual_split", "--width", "64", "--repeats", "1"])
    dual_split.main()
    out = capsys.readouterr().out
    shares = {
        name: float(share)
        for name, share in re.findall(r"(all atoms|rank \d's): +\d+ ms \(([\d.]+) of all\)", out)
    }
    assert set(shares) == {"all atoms", "rank 0's", "rank 1's"}
    assert shares["all atoms"] == 1.0
    # one thread, timed apart: the two shares add up to about the whole
    assert 0.5 < shares["rank 0's"] + shares["rank 1's"] < 1.5
