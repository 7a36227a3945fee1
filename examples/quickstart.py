"""Train a residual MLP on sklearn's digits with a hand-written normalized-SGD loop.

Each step takes the gradient, rescales it to modular norm `lr` with `net.normalize`, and
subtracts it: no optimizer class, just the one call that modnorm adds to plain SGD.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import modnorm as mn

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32)
x = (x - x.mean(0)) / (x.std(0) + 1e-6)
y = torch.tensor(digits.target)
perm = torch.randperm(len(x))
train, test = perm[:1500], perm[1500:]  # hold out 297 digits to see generalization

net = mn.ResMLP(64, 10, width=128, num_blocks=4)
print(net)
steps = 400
for step in range(steps + 1):
    idx = train[torch.randint(0, len(train), (128,))]
    loss = F.cross_entropy(net(x[idx]), y[idx])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    lr = 0.5 * (1 - step / (steps + 1))  # the step's modular norm, decayed linearly
    with torch.no_grad():
        for p, u in zip(net.parameters(), net.normalize(grads, lr), strict=True):
            p.sub_(u)
    if step % 50 == 0:
        print(f"step {step:4d}   train loss {loss.item():.4f}")

with torch.no_grad():
    test_loss = F.cross_entropy(net(x[test]), y[test]).item()
    accuracy = (net(x[test]).argmax(1) == y[test]).float().mean().item()
print(f"held-out digits: loss {test_loss:.4f}, accuracy {accuracy:.3f}")
