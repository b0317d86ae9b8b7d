"""data/prefetch.py: the loader's own batches in its order, its errors where they happened, no thread left."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lora_cls.data.prefetch import prefetched


def _threads() -> int:
    return sum(t.name == "lora-cls-prefetch" for t in threading.enumerate())


def test_prefetched_batches_equal_the_loaders_in_order_and_leave_its_generator_where_it_would():
    data = TensorDataset(torch.arange(40).view(20, 2), torch.arange(20))

    def loader(seed: int) -> DataLoader:
        return DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(seed))

    plain, ahead = loader(7), loader(7)
    assert [y.tolist() for _, y in prefetched(ahead)] == [y.tolist() for _, y in plain]
    # the next epoch's shuffle is the same: the loader's generator advanced exactly as in the main thread
    assert torch.equal(plain.generator.get_state(), ahead.generator.get_state())
    assert _threads() == 0


def test_an_error_while_loading_is_raised_at_the_item_it_stopped_at():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(items()):
            got.append(item)
    assert got == [1, 2] and _threads() == 0


def test_leaving_early_stops_the_thread_even_when_it_is_waiting_to_hand_over():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    batches = prefetched(endless(), depth=2)
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    time.sleep(0.1)  # the thread fills the queue and waits
    assert len(produced) <= 3 + 2 + 1  # never more than depth ahead (+ the one it holds)
    batches.close()
    assert _threads() == 0
