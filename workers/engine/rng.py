"""Explicit randomness: every stream is a ``torch.Generator`` seeded from a tuple of integers."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads on first use: the driver derives seeds without it
    import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes and Python versions)."""
    digest = hashlib.blake2b(b",".join(str(int(k)).encode() for k in keys), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    import torch

    return torch.Generator(device=torch.device(device)).manual_seed(seed)


#: Stream tags, so that the streams of one seed never collide.
NETWORK_STREAM = 1
DATA_STREAM = 2
