"""Which implementation runs a pack's sampled-loss steps: the torch path or the fused Triton kernels.

``kernel``: ``auto`` (Triton on CUDA when triton imports, else torch) | ``torch`` | ``triton``.
``precision``: ``ieee`` (exact FP32, the default) | ``tf32`` (Triton float32 dots on tensor cores).
Triton runs on CUDA devices, or on the CPU under its interpreter when asked for explicitly
(``kernel=triton`` with ``TRITON_INTERPRET=1``: slow, for tests).
Importing this package does not import triton; :func:`select` does, when it is needed.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .fused import FusedOps

KERNELS = ("auto", "torch", "triton")
PRECISIONS = ("ieee", "tf32")
MAX_DIM = 256
"""Widest input the kernels take: a program holds a (particles x d) tile of z and of its gradient."""
MAX_OUT_DIM = 64


class KernelUnavailable(RuntimeError):
    """The fused kernels cannot run this pack (raised on the first step; the pack falls back to torch)."""


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def notice(message: str) -> None:
    """A one-line notice that a pack runs on the torch path instead of the kernels it would use."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def select(kernel: str, precision: str, *, device: torch.device, dtype: torch.dtype, unit: str, bias: bool,
           gaussian_var: float, dim: int, out_dim: int) -> FusedOps | None:
    """The fused ops for this pack, or None for the torch path. Bad or impossible choices raise ValueError."""
    if kernel not in KERNELS:
        raise ValueError(f"execution.kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"execution.precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if kernel == "torch" or (kernel == "auto" and not (device.type == "cuda" and triton_importable())):
        return None
    if not triton_importable():
        raise ValueError("execution.kernel=triton but triton is not installed; pip install triton, "
                         "or set execution.kernel=auto")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"execution.kernel=triton needs a CUDA device, not {device.type} (or TRITON_INTERPRET=1 "
                         "for Triton's CPU interpreter); set execution.kernel=auto or torch")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"execution.kernel=triton runs float32 or float64, not {dtype}; set execution.dtype")
    if dim > MAX_DIM or out_dim > MAX_OUT_DIM:
        notice(f"fused kernels take d <= {MAX_DIM} and k <= {MAX_OUT_DIM} (got d={dim}, k={out_dim}): "
               "this pack runs on the torch path")
        return None
    from .fused import FusedOps

    return FusedOps(unit, bias, gaussian_var, dim, out_dim, dtype, precision, device)


__all__ = ["KERNELS", "PRECISIONS", "KernelUnavailable", "interpreting", "notice", "select", "triton_importable"]
