"""Data that works offline: sklearn's digits, character-level text from any file, and
CIFAR-10 from a local torchvision folder. Nothing is ever downloaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass
class Dataset:
    """Tensors of one task. ``kind`` is ``"classify"`` (``y`` is a class per example) or
    ``"text"`` (``train``/``val`` are token streams, sampled as random windows)."""

    kind: str
    name: str
    num_classes: int
    x_train: Tensor | None = None
    y_train: Tensor | None = None
    x_test: Tensor | None = None
    y_test: Tensor | None = None
    train: Tensor | None = None
    val: Tensor | None = None
    vocab: str = ""
    input_noise: float = 0.0  # std of fresh Gaussian noise added to every training batch

    @property
    def in_shape(self) -> tuple[int, ...]:
        assert self.x_train is not None
        return tuple(self.x_train.shape[1:])

    def batch(
        self, batch_size: int, generator: torch.Generator, context: int = 0
    ) -> tuple[Tensor, Tensor]:
        """A training batch: random examples (with fresh input noise), or random text windows."""
        if self.kind == "text":
            assert self.train is not None
            return text_windows(self.train, batch_size, context, generator)
        assert self.x_train is not None and self.y_train is not None
        idx = torch.randint(0, len(self.x_train), (batch_size,), generator=generator)
        x = self.x_train[idx]
        if self.input_noise > 0:
            x = x + self.input_noise * torch.randn(x.shape, generator=generator)
        return x, self.y_train[idx]


def digits(image: bool = False, input_noise: float = 0.0, test_size: int = 297) -> Dataset:
    """sklearn's 1,797 handwritten 8×8 digits, standardized with training statistics, split
    by a fixed permutation into 1,500 training and 297 test images. ``image=True`` gives
    ``(N, 1, 8, 8)`` tensors, otherwise ``(N, 64)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    if image:
        x = x.view(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    return _split_standardized("digits", x, y, input_noise, test_size)


def _split_standardized(
    name: str, x: Tensor, y: Tensor, input_noise: float, test_size: int
) -> Dataset:
    """``(x, y)`` split by a fixed permutation into training and ``test_size`` test examples,
    each input feature standardized with training statistics (for 10 classes)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    train, test = perm[: len(x) - test_size], perm[len(x) - test_size :]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / (std + 1e-6)  # constant-zero pixels stay zero
    return Dataset(
        kind="classify",
        name=name,
        num_classes=10,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        input_noise=input_noise,
    )


def text(path: str | Path, val_fraction: float = 0.1) -> Dataset:
    """Characters of a UTF-8 file: vocabulary from the file, first 90 % for training, last
    10 % for validation (as for tinyshakespeare)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text data file not found: {p}")
    content = p.read_text(encoding="utf-8")
    if len(content) < 100:
        raise ValueError(f"{p} holds {len(content)} characters; a corpus needs at least 100")
    vocab = "".join(sorted(set(content)))
    lookup = {c: i for i, c in enumerate(vocab)}
    tokens = torch.tensor([lookup[c] for c in content], dtype=torch.long)
    n = int((1 - val_fraction) * len(tokens))
    return Dataset(
        kind="text",
        name=p.name,
        num_classes=len(vocab),
        train=tokens[:n],
        val=tokens[n:],
        vocab=vocab,
    )


def text_windows(
    tokens: Tensor, batch_size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random windows ``x = tokens[i : i+c]`` and their next tokens ``y = tokens[i+1 : i+c+1]``."""
    if len(tokens) <= context + 1:
        raise ValueError(
            f"a context of {context} needs more than {context + 1} tokens, got {len(tokens)}"
        )
    start = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)
    offsets = torch.arange(context)
    x = tokens[start[:, None] + offsets]
    y = tokens[start[:, None] + offsets + 1]
    return x, y


def cifar10(root: str | Path) -> Dataset:
    """CIFAR-10 from a folder that torchvision has already downloaded to; never downloads."""
    try:
        import torchvision
    except ImportError as e:
        raise RuntimeError("CIFAR-10 needs torchvision: pip install torchvision") from e
    try:
        train = torchvision.datasets.CIFAR10(str(root), train=True, download=False)
        test = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"no CIFAR-10 data under {root} (it is never downloaded): {e}"
        ) from e

    def tensors(ds: Any) -> tuple[Tensor, Tensor]:
        x = torch.tensor(ds.data, dtype=torch.float32).permute(0, 3, 1, 2) / 255
        return x, torch.tensor(ds.targets, dtype=torch.long)

    xtr, ytr = tensors(train)
    xte, yte = tensors(test)
    mean, std = xtr.mean(dim=(0, 2, 3), keepdim=True), xtr.std(dim=(0, 2, 3), keepdim=True)
    return Dataset(
        kind="classify",
        name="cifar10",
        num_classes=10,
        x_train=(xtr - mean) / std,
        y_train=ytr,
        x_test=(xte - mean) / std,
        y_test=yte,
    )


def load(spec: str, image: bool = False, input_noise: float = 0.0) -> Dataset:
    """``digits``, ``text:PATH`` or ``cifar10:DIR``."""
    if spec == "digits":
        return digits(image=image, input_noise=input_noise)
    if spec.startswith("text:"):
        return text(spec[len("text:") :])
    if spec.startswith("cifar10:"):
        ds = cifar10(spec[len("cifar10:") :])
        ds.input_noise = input_noise
        return ds
    raise ValueError(f"unknown data {spec!r}: use digits, text:PATH or cifar10:DIR")
