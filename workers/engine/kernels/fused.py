"""Fused Triton kernels for the sampled-loss step of a width group (imports triton; load it lazily).

A group holds S networks of n particles: z (S, n, d), b (S, n) | None, c (S, n, k). For a batch x (P, d),
y (P, k) the torch path materializes the (P, S*n) activation and its masks; here it never leaves the chip:

* forward, grid (P blocks, S, splits): per network, f(x_p) = sum_i c_i phi(x_p; z_i) over one share of the
  particles, the pre-activation tile x @ z^T formed in registers and reduced over the particles at once.
  It writes raw partial sums (splits, S, P, k); the output scale is applied by the reader.
* backward, grid (particle blocks, S): recomputes each (P tile x particle block) activation, forms the
  residual r = (s f - y) / P from the partial sums, and accumulates E[r phi_i] (the c gradient), the
  masked, residual-weighted activation's column sums (the bias gradient) and its product with x (the z
  gradient) over the batch; then the per-particle potential V_i = c_i . E[r phi_i], the loss of the batch,
  and the update of the block's own particles. Only the program that owns a particle reads or writes it,
  so the update in place is race-free.

Both passes compute what ``Pack._sampled_step`` computes, in the same order of operations up to the order
of the sums. float32 dots use ``input_precision="ieee"`` (exact FP32 FMAs) unless tf32 is asked for; every
dot names its ``out_dtype`` (Triton 3.6 defaults it to float32, which a float64 accumulator rejects).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from . import KernelUnavailable

Tensor = torch.Tensor

RELU, TANH, SIGMOID, GAUSSIAN = 0, 1, 2, 3
UNIT_CODES = {"relu": RELU, "tanh": TANH, "sigmoid": SIGMOID, "gaussian": GAUSSIAN}


@triton.jit
def _activate(x, z, b, zsq, xsq, gauss_scale, gauss_log_norm, UNIT: tl.constexpr, HAS_BIAS: tl.constexpr,
              PRECISION: tl.constexpr):
    """phi(x_p; z_i) of a (P tile, particle block); x (BP, BD), z (BN, BD) -> (BP, BN)."""
    dot = tl.dot(x, tl.trans(z), input_precision=PRECISION, out_dtype=x.dtype)
    if UNIT == 3:
        # -|x - z|^2 / (2 s^2) + log normaliser, as (2 x.z - |z|^2 - |x|^2) * 0.5 / s^2 (as the torch path)
        out = tl.exp((2.0 * dot - zsq[None, :] - xsq[:, None]) * gauss_scale + gauss_log_norm)
    else:
        pre = dot
        if HAS_BIAS:
            pre = pre + b[None, :]
        if UNIT == 0:
            out = tl.where(pre < 0.0, 0.0, pre)  # relu that keeps NaN (divergence must show in the loss)
        elif UNIT == 1:
            t = tl.exp(-2.0 * tl.abs(pre))  # tanh from exp, without overflow for large |pre|
            mag = (1.0 - t) / (1.0 + t)
            out = tl.where(pre < 0.0, -mag, mag)
        else:
            out = 1.0 / (1.0 + tl.exp(-pre))
    return out  # one return: static branches only


# Sizes that vary by group and batch are not specialized on (fewer builds); d and k are (aligned loads).
@triton.jit(do_not_specialize=["P", "N", "n_per_split"])
def _forward_kernel(x_ptr, z_ptr, b_ptr, c_ptr, out_ptr, consts_ptr, P, N, D, K, n_per_split,
                    UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALAR_OUT: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_p = tl.program_id(0)
    s = tl.program_id(1)
    split = tl.program_id(2)
    gauss_scale = tl.load(consts_ptr)
    gauss_log_norm = tl.load(consts_ptr + 1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_mask = offs_p < P
    d_mask = offs_d < D
    x = tl.load(x_ptr + offs_p[:, None] * D + offs_d[None, :], mask=p_mask[:, None] & d_mask[None, :], other=0.0)
    xsq = tl.sum(x * x, 1)
    zero_row = tl.zeros((BLOCK_N,), dtype=x.dtype)
    # This split's particles: [n_lo, n_lo + n_per_split) (a multiple of BLOCK_N), masked at N.
    n_lo = split * n_per_split
    # k = 1: an elementwise (P, particles) accumulator reduced once after the loop; k > 1: a dot into (P, k).
    acc = tl.zeros((BLOCK_P, BLOCK_N if SCALAR_OUT else BLOCK_K), dtype=x.dtype)
    offs_k = tl.arange(0, BLOCK_K)
    for n0 in range(n_lo, n_lo + n_per_split, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        rows = s * N + offs_n
        z = tl.load(z_ptr + rows[:, None] * D + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        b = zero_row
        if HAS_BIAS:
            b = tl.load(b_ptr + rows, mask=n_mask, other=0.0)
        zsq = tl.sum(z * z, 1)
        phi = _activate(x, z, b, zsq, xsq, gauss_scale, gauss_log_norm, UNIT, HAS_BIAS, PRECISION)
        # Padded particles have c = 0, so they add nothing whatever phi is there.
        if SCALAR_OUT:
            c = tl.load(c_ptr + rows, mask=n_mask, other=0.0)
            acc += phi * c[None, :]  # reduced over the particles once, after the loop
        else:
            c = tl.load(c_ptr + rows[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & (offs_k[None, :] < K),
                        other=0.0)
            acc = tl.dot(phi, c, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    base = out_ptr + (split * tl.num_programs(1) + s) * P * K
    if SCALAR_OUT:
        tl.store(base + offs_p, tl.sum(acc, 1), mask=p_mask)
    else:
        tl.store(base + offs_p[:, None] * K + offs_k[None, :], acc, mask=p_mask[:, None] & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["P", "N", "n_splits"])
def _backward_kernel(x_ptr, y_ptr, part_ptr, z_ptr, b_ptr, c_ptr, scale_ptr, move_ptr, pot_ptr, loss_ptr,
                     consts_ptr, P, N, D, K, n_splits,
                     UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, SCALAR_OUT: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    s = tl.program_id(1)
    n_nets = tl.num_programs(1)
    gauss_scale = tl.load(consts_ptr)
    gauss_log_norm = tl.load(consts_ptr + 1)
    gauss_var = tl.load(consts_ptr + 2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    d_mask = offs_d < D
    k_mask = offs_k < K
    rows = s * N + offs_n
    nd_mask = n_mask[:, None] & d_mask[None, :]
    z = tl.load(z_ptr + rows[:, None] * D + offs_d[None, :], mask=nd_mask, other=0.0)
    zsq = tl.sum(z * z, 1)
    b = tl.zeros((BLOCK_N,), dtype=z.dtype)
    if HAS_BIAS:
        b = tl.load(b_ptr + rows, mask=n_mask, other=0.0)
    if SCALAR_OUT:
        c = tl.load(c_ptr + rows, mask=n_mask, other=0.0)
        hr_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=z.dtype)
    else:
        c = tl.load(c_ptr + rows[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        hr_acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=z.dtype)
    scale = tl.load(scale_ptr + s)
    move = tl.load(move_ptr + s)
    gsum_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=z.dtype)
    gz = tl.zeros((BLOCK_N, BLOCK_D), dtype=z.dtype)
    loss_acc = tl.zeros((BLOCK_P,), dtype=z.dtype)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_mask = offs_p < P
        x = tl.load(x_ptr + offs_p[:, None] * D + offs_d[None, :], mask=p_mask[:, None] & d_mask[None, :], other=0.0)
        xsq = tl.sum(x * x, 1)
        # Residual of this P tile: (s * sum of the forward's partial sums - y), zero on padded rows.
        if SCALAR_OUT:
            f = tl.zeros((BLOCK_P,), dtype=z.dtype)
            for j in range(0, n_splits):
                f += tl.load(part_ptr + (j * n_nets + s) * P + offs_p, mask=p_mask, other=0.0)
            err = f * scale - tl.load(y_ptr + offs_p, mask=p_mask, other=0.0)
            loss_acc += err * err
        else:
            pk_mask = p_mask[:, None] & k_mask[None, :]
            f2 = tl.zeros((BLOCK_P, BLOCK_K), dtype=z.dtype)
            for j in range(0, n_splits):
                f2 += tl.load(part_ptr + ((j * n_nets + s) * P + offs_p[:, None]) * K + offs_k[None, :],
                              mask=pk_mask, other=0.0)
            err2 = f2 * scale - tl.load(y_ptr + offs_p[:, None] * K + offs_k[None, :], mask=pk_mask, other=0.0)
            loss_acc += tl.sum(err2 * err2, 1)
        phi = _activate(x, z, b, zsq, xsq, gauss_scale, gauss_log_norm, UNIT, HAS_BIAS, PRECISION)
        # dL/df per sample, r = err / P (the output scale enters through `move`).
        if SCALAR_OUT:
            r = err / P
            hr_acc += phi * r[:, None]
            gh = r[:, None] * c[None, :]
        else:
            r2 = err2 / P
            hr_acc = tl.dot(tl.trans(phi), r2, hr_acc, input_precision=PRECISION, out_dtype=hr_acc.dtype)
            gh = tl.dot(r2, tl.trans(c), input_precision=PRECISION, out_dtype=z.dtype)
        # Through the unit: d phi / d pre, written in terms of phi as the torch path does.
        if UNIT == 0:
            gh = tl.where(phi > 0.0, gh, 0.0)
        elif UNIT == 1:
            gh = gh * (1.0 - phi * phi)
        elif UNIT == 2:
            gh = gh * (1.0 - phi) * phi
        else:
            gh = gh * phi
        gh = tl.where(p_mask[:, None], gh, 0.0)
        gsum_acc += gh
        gz = tl.dot(tl.trans(gh), x, gz, input_precision=PRECISION, out_dtype=gz.dtype)
    gsum = tl.sum(gsum_acc, 0)
    if SCALAR_OUT:
        hr = tl.sum(hr_acc, 0)
        tl.store(pot_ptr + rows, c * hr, mask=n_mask)
        tl.store(c_ptr + rows, c - move * hr, mask=n_mask)
    else:
        tl.store(pot_ptr + rows, tl.sum(c * hr_acc, 1), mask=n_mask)
        tl.store(c_ptr + rows[:, None] * K + offs_k[None, :], c - move * hr_acc,
                 mask=n_mask[:, None] & k_mask[None, :])
    if UNIT == 3:
        gz = (gz - z * gsum[:, None]) / gauss_var  # d phi / d centre = phi (x - centre) / s^2
    elif HAS_BIAS:
        tl.store(b_ptr + rows, b - move * gsum, mask=n_mask)
    tl.store(z_ptr + rows[:, None] * D + offs_d[None, :], z - move * gz, mask=nd_mask)
    if pid_n == 0:
        tl.store(loss_ptr + s, 0.5 * tl.sum(loss_acc, 0) / P)


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one launch pair (powers of two; every dot operand dimension is >= 16)."""

    fwd_p: int
    fwd_n: int
    bwd_p: int
    bwd_n: int
    splits: int
    """Forward: how many programs share one network's particles (more parallelism for wide, few networks)."""
    fwd_warps: int = 4
    bwd_warps: int = 4


def _pow2(v: int, lo: int) -> int:
    return max(lo, triton.next_power_of_2(v))


def choose_tiles(s: int, n: int, p: int, d: int, k: int, sm_count: int) -> Tiles:
    """Tile sizes by shape, chosen from ptxas register counts for sm_90 (not yet timed on a GPU): for d <= 32
    and k = 1, a 64 x 64 forward tile on 8 warps (126 registers) and a 64 x 32 backward tile on 4 warps
    (128 registers), no spills, 16 warps per SM; 32 x 32 tiles for wider inputs or vector outputs. Enough
    forward splits to give every SM a few programs."""
    if _pow2(d, 16) > 32 or k > 1:
        fwd_p = fwd_n = bwd_p = bwd_n = 32
        fwd_warps = 4
    else:
        fwd_p, fwd_n, bwd_p, bwd_n = 64, 64, 64, 32
        fwd_warps = 8
    programs = s * triton.cdiv(p, fwd_p)
    splits = max(1, min(triton.cdiv(4 * sm_count, programs), triton.cdiv(n, 4 * fwd_n)))
    return Tiles(fwd_p=fwd_p, fwd_n=fwd_n, bwd_p=bwd_p, bwd_n=bwd_n, splits=splits, fwd_warps=fwd_warps,
                 bwd_warps=4)


class FusedOps:
    """The fused forward/backward for one pack's unit, input and output sizes, dtype and precision."""

    def __init__(self, unit: str, bias: bool, gaussian_var: float, dim: int, out_dim: int, dtype: torch.dtype,
                 precision: str, device: torch.device) -> None:
        self.unit = UNIT_CODES[unit]
        self.has_bias = bias and self.unit != GAUSSIAN
        self.var = gaussian_var
        self.dim, self.out_dim = dim, out_dim
        self.dtype = dtype
        # tf32 applies to float32 only; float64 dots are always exact.
        self.precision = precision if dtype == torch.float32 else "ieee"
        self.block_d = _pow2(dim, 16)
        self.block_k = 1 if out_dim == 1 else _pow2(out_dim, 16)
        self.sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                         if device.type == "cuda" else 1)
        # Gaussian-unit constants as a tensor of the pack's dtype (a Python float would enter as float32).
        self.consts = torch.tensor([0.5 / gaussian_var, -0.5 * dim * math.log(2 * math.pi * gaussian_var),
                                    gaussian_var], device=device, dtype=dtype)
        self._compiled: set[str] = set()

    def _launch(self, name: str, kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        """Launch; a failure of a kernel's first launch (compilation: e.g. float64 dots on a GPU whose Triton
        lacks them) is KernelUnavailable, which sends the pack to the torch path. Nothing is written before a
        kernel compiles, so the step can be redone there."""
        if name in self._compiled:
            kernel[grid](*args, **kwargs)
            return
        try:
            kernel[grid](*args, **kwargs)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise KernelUnavailable(f"Triton {name} kernel failed to build for {self.dtype} ({first})") from exc
        self._compiled.add(name)

    def tiles(self, s: int, n: int, p: int) -> Tiles:
        return choose_tiles(s, n, p, self.dim, self.out_dim, self.sm_count)

    def _consts(self) -> dict[str, object]:
        return {"UNIT": self.unit, "HAS_BIAS": self.has_bias, "SCALAR_OUT": self.out_dim == 1,
                "BLOCK_D": self.block_d, "BLOCK_K": self.block_k, "PRECISION": self.precision}

    def partial_sums(self, z: Tensor, b: Tensor | None, c: Tensor, x: Tensor, tiles: Tiles) -> Tensor:
        """Raw (unscaled) sum_i c_i phi(x_p; z_i) over each split's particles: (splits, S, P, k)."""
        s, n, d = z.shape
        p = x.shape[0]
        out = torch.empty((tiles.splits, s, p, self.out_dim), device=x.device, dtype=x.dtype)
        per_split = triton.cdiv(triton.cdiv(n, tiles.splits), tiles.fwd_n) * tiles.fwd_n
        grid = (triton.cdiv(p, tiles.fwd_p), s, tiles.splits)
        self._launch("forward", _forward_kernel, grid, x, z, z if b is None else b, c, out, self.consts, p, n, d,
                     self.out_dim, per_split, BLOCK_P=tiles.fwd_p, BLOCK_N=tiles.fwd_n, num_warps=tiles.fwd_warps,
                     **self._consts())
        return out

    def predict(self, z: Tensor, b: Tensor | None, c: Tensor, scale: Tensor, x: Tensor) -> Tensor:
        """f_n (S, P, k) of every network of the group."""
        _check(z, b, c, x)
        tiles = self.tiles(z.shape[0], z.shape[1], x.shape[0])
        return self.partial_sums(z, b, c, x.contiguous(), tiles).sum(0) * scale.view(-1, 1, 1)

    def step(self, z: Tensor, b: Tensor | None, c: Tensor, scale: Tensor, move: Tensor, x: Tensor,
             y: Tensor) -> tuple[Tensor, Tensor]:
        """One gradient step of every network on the batch (x, y), updating z, b, c in place.

        ``scale`` (S,) is the output scale s and ``move`` (S,) the step eta * s; they are read at every call
        (a schedule may change them). Returns (batch losses (S,), potentials V (S, n) before the step).
        """
        _check(z, b, c, x)
        s, n, d = z.shape
        p = x.shape[0]
        x, y = x.contiguous(), y.contiguous()
        tiles = self.tiles(s, n, p)
        part = self.partial_sums(z, b, c, x, tiles)
        potential = torch.empty((s, n), device=z.device, dtype=z.dtype)
        loss = torch.empty((s,), device=z.device, dtype=z.dtype)
        grid = (triton.cdiv(n, tiles.bwd_n), s)
        self._launch("backward", _backward_kernel, grid, x, y, part, z, z if b is None else b, c,
                     scale.contiguous(), move.contiguous(), potential, loss, self.consts, p, n, d, self.out_dim,
                     tiles.splits, BLOCK_P=tiles.bwd_p, BLOCK_N=tiles.bwd_n, num_warps=tiles.bwd_warps,
                     **self._consts())
        return loss, potential


def _check(z: Tensor, b: Tensor | None, c: Tensor, x: Tensor) -> None:
    # The kernels index raw storage: the group's tensors must be dense (the engine keeps them so).
    if not (z.is_contiguous() and c.is_contiguous() and (b is None or b.is_contiguous())):
        raise ValueError("fused kernels need contiguous particle tensors")
    if max(z.numel(), c.numel(), x.numel()) >= 2**31:
        raise KernelUnavailable("a group or batch of 2^31 or more elements exceeds the kernels' 32-bit offsets")
    if x.dtype != z.dtype:
        raise ValueError(f"batch dtype {x.dtype} differs from the particles' {z.dtype}")
