"""Shared fixtures of the engine tests.

The engine's tensors here are tiny, so one intra-op thread is both faster and steadier than several on a
small CI machine (measured: a 200-particle exact-energy step took 2 ms on one thread, 3-13 ms on two).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
