"""Memory planning: the peak bytes of a pack, from its widths and shapes alone (torch-free, so the planner
checks a sweep against the workers' memory before any tensor, or torch itself, is loaded)."""

from __future__ import annotations

from collections.abc import Sequence

#: Bytes per element of the dtypes a pack may use (execution.dtype).
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def estimate_pack_bytes(
    widths: Sequence[int],
    *,
    batch: int,
    dim: int,
    out_dim: int = 1,
    dtype: str = "float32",
    exact: bool = False,
    n_test: int = 4096,
) -> int:
    """Peak memory of a pack of networks with these widths (one entry per network), in bytes.

    Parameters and their copies live for the whole run; the (S, P, n) activation buffers (two per group,
    plus a (S, P, k) output) and, under exact energies, the (S, n, n) kernel are per group and freed before
    the next group, so the peak holds the largest group's buffers. The test evaluation is chunked to at
    most 2^24 activations.
    """
    if any(w < 1 for w in widths):
        raise ValueError("widths must be positive")
    item = DTYPE_BYTES[dtype]
    by_width: dict[int, int] = {}
    for w in widths:
        by_width[w] = by_width.get(w, 0) + 1
    params = sum(w * (dim + 1 + out_dim) for w in widths) * 3  # params, gradients, birth-death copies
    per_group = []
    for w, s in by_width.items():
        act = 2 * s * batch * w + s * batch * out_dim
        if exact:
            act = 3 * s * w * w + 2 * s * w * (dim + out_dim)
        per_group.append(act)
    eval_chunk = min(1 << 24, max(by_width.values()) * max(by_width) * n_test) * 2
    data = batch * (dim + out_dim) * 2
    return item * (params + max(per_group) + eval_chunk + data)
