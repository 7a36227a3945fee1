"""Independent computations the tests compare the library against."""

import torch


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMS norm over the last dimension, worst example of the batch."""
    return x.square().mean(dim=-1).sqrt().max()


def randn_like_params(
    module: torch.nn.Module, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    return [torch.randn_like(p, dtype=dtype) for p in module.parameters()]
