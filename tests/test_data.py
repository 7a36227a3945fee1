import pytest
import torch

from modnorm import data


def test_digits_split_and_standardization() -> None:
    d = data.digits()
    assert d.x_train is not None and d.x_test is not None and d.y_train is not None
    assert d.x_train.shape == (1500, 64) and d.x_test.shape == (297, 64)
    assert torch.allclose(d.x_train.mean(0), torch.zeros(64), atol=1e-5)
    again = data.digits()
    assert torch.equal(again.x_test, d.x_test)  # a fixed split
    img = data.digits(image=True)
    assert img.in_shape == (1, 8, 8)


def test_digits_batches_get_fresh_noise() -> None:
    d = data.digits(input_noise=0.5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x1, y1 = d.batch(16, g1)
    x2, y2 = d.batch(16, g2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # reproducible from the generator
    x3, _ = d.batch(16, g1)
    assert not torch.equal(x1, x3)
    clean = data.digits()
    gen = torch.Generator().manual_seed(0)
    xc, _ = clean.batch(16, gen)
    noise = x1 - xc
    assert 0.4 < float(noise.std()) < 0.6


def test_text_windows_are_shifted_by_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "corpus.txt"
    text = "abcdefghij" * 30
    path.write_text(text)
    d = data.text(path)
    assert d.vocab == "abcdefghij" and d.num_classes == 10
    assert d.train is not None and d.val is not None
    assert len(d.train) == 270 and len(d.val) == 30
    decoded = "".join(d.vocab[i] for i in torch.cat([d.train, d.val]).tolist())
    assert decoded == text
    x, y = d.batch(5, torch.Generator().manual_seed(0), context=8)
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal((x + 1) % 10, y)  # the corpus is a repeating alphabet


def test_bad_data_specs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load(f"text:{tmp_path / 'missing.txt'}")
    with pytest.raises(ValueError, match="unknown data"):
        data.load("mnist")
    with pytest.raises((RuntimeError, FileNotFoundError)):
        data.load(f"cifar10:{tmp_path}")
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="at least 100"):
        data.text(short)
