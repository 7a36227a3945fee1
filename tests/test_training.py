"""End to end: a hand-written normalized-SGD loop (no optimizer class) trains a ResMLP."""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import modnorm as mn


def test_normalized_sgd_on_digits_lowers_the_loss() -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    net = mn.ResMLP(64, 10, width=64, num_blocks=2)
    gen = torch.Generator().manual_seed(0)

    def loss_on_all() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(net(x), y))

    start = loss_on_all()
    for step in range(300):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        grads = torch.autograd.grad(loss, list(net.parameters()))
        lr = 0.5 * (1 - step / 300)
        with torch.no_grad():
            for p, u in zip(net.parameters(), net.normalize(grads, lr), strict=True):
                p.sub_(u)
    end = loss_on_all()
    accuracy = float((net(x).argmax(1) == y).float().mean())
    assert end < 0.25 * start
    assert accuracy > 0.9
