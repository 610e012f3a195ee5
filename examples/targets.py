"""Target functions for ``task.kind: function`` (``target: examples.targets:NAME``).

A target maps a (P, d) float tensor to (P,) or (P, k), with torch operations only, so it runs on whatever
device the pack trains on. Run from the repository root, or set ``task.module_dir`` to the folder that holds
``examples/``; on a Ray cluster mfsweep ships this package to the workers (runtime_env py_modules).
"""

from __future__ import annotations

import torch


def ridge_mix(x: torch.Tensor) -> torch.Tensor:
    """A smooth, a kinked and an oscillating ridge profile along three fixed directions (d >= 3):
    f(x) = tanh(2 x_1) + |x_2 - x_3| / sqrt(2) + sin(3 (x_1 + x_2 + x_3) / sqrt(3)) / 2."""
    s3 = (x[:, 0] + x[:, 1] + x[:, 2]) / 3**0.5
    return torch.tanh(2.0 * x[:, 0]) + (x[:, 1] - x[:, 2]).abs() / 2**0.5 + 0.5 * torch.sin(3.0 * s3)


def radial_pair(x: torch.Tensor) -> torch.Tensor:
    """Two outputs (k = 2): a radial bump exp(-|x|^2 / d) and the product x_1 x_2."""
    d = x.shape[1]
    return torch.stack([torch.exp(-x.pow(2).sum(1) / d), x[:, 0] * x[:, 1]], dim=1)
