"""modnorm.parallel: PyTorch's tensor-parallel styles for modnorm's atoms (the four-rank
training runs are in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import modnorm as mn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")


@pytest.mark.parametrize("style", ["ColwiseParallel", "RowwiseParallel"])
@pytest.mark.parametrize("module", [mn.Bias(4), mn.Conv2d(3, 4, 3), mn.GELU()])
def test_a_style_names_what_it_cannot_cut(style: str, module: mn.Module) -> None:
    import modnorm.parallel as parallel

    with pytest.raises(ValueError, match=f"{style} shards a modnorm Linear or Embedding"):
        getattr(parallel, style)()._apply(module, None)
