from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def restore_torch() -> Iterator[None]:
    """A benchmark's worker or ``main`` sets one thread and flushes denormals, as it should
    in its own process; this undoes both for the tests that call one in-process."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)
