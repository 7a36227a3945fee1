import pytest
import torch

from modnorm import baselines


def test_shapes_and_standard_initialization() -> None:
    mlp = baselines.torch_mlp(64, 10, 32, depth=3)
    assert mlp(torch.randn(5, 8, 8)).shape == (5, 10)  # flattens its input
    res = baselines.torch_resmlp(64, 10, 32, num_blocks=3, block_depth=2)
    assert res(torch.randn(5, 64)).shape == (5, 10)
    assert sum(isinstance(m, torch.nn.Linear) for m in res.modules()) == 2 + 3 * 2
    cnn = baselines.torch_rescnn(1, 10, 8, num_blocks=2)
    assert cnn(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    # PyTorch's default init: uniform in ±1/√fan_in, with biases
    first = next(m for m in res.modules() if isinstance(m, torch.nn.Linear))
    assert first.bias is not None
    assert float(first.weight.detach().abs().max()) <= 1 / 64**0.5


def test_torch_gpt_is_causal() -> None:
    gpt = baselines.TorchGPT(vocab_size=11, context=8, width=16, num_heads=2, num_blocks=2)
    idx = torch.randint(0, 11, (2, 8))
    out = gpt(idx)
    assert out.shape == (2, 8, 11)
    idx2 = idx.clone()
    idx2[:, 5:] = (idx2[:, 5:] + 1) % 11
    assert torch.allclose(gpt(idx2)[:, :5], out[:, :5], atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        baselines.TorchGPT(11, 8, 15, 2, 1)
    with pytest.raises(ValueError, match="unknown activation"):
        baselines.torch_mlp(4, 2, 8, activation="tanh")(torch.randn(1, 4))
