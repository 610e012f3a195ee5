"""A pack: many mean-field networks trained together as one cloud of particles.

Layout. Networks of equal width form a *group* whose particles are dense batched tensors, z (S, n, d),
b (S, n), c (S, n, k): every step is a handful of batched matmuls per group (``baddbmm``/``bmm``) on one
shared batch, with hand-derived gradients, so a sweep of W widths x S seeds costs O(W) kernel launches a
step instead of O(W S) and never needs segment sums, atomics or autograd graphs. Networks never share a
reduction, so each network's numbers are independent of its pack-mates (a NaN stays in its own row).

Dynamics of a network with n particles, time step dt and output scale s (1/n mean-field, n^-1/2 ntk):
GD/SGD with raw learning rate eta = n dt (mean-field) or dt (ntk) on L = 1/2 E|f_n(x) - f(x)|^2, i.e. each
particle moves by -eta * grad_theta_i L = -(eta s) E[(f_n - f) grad(c_i phi_i)]; optional Langevin noise
sqrt(2 dt T) per coordinate; optional birth-death (see :mod:`.birth_death`) using the per-particle
potential V_i = c_i . E[(f_n - f) phi_i] of the same batch, evaluated before the step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import birth_death, kernels
from .compat import check_compatible
from .reports import NetMetrics, Report, Retired, estimate_from_json, report_from_json
from .rng import DATA_STREAM, NETWORK_STREAM, derive_seed, generator
from .schedule import lr_factor
from .specs import (
    Algorithm,
    DynamicsSpec,
    LrSchedule,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Parametrization,
    RateConvention,
    Scheme,
    StopRule,
    TaskSpec,
    Unit,
    from_dict,
    to_dict,
)
from .stopping import Estimate, Window
from .tasks import GaussianMixtureTask, SplitArrays, Task, make_task

Tensor = torch.Tensor
CHECKPOINT_FORMAT = 2
"""2: state only. 1 (read, not written) also held the report history, which the report log now keeps."""


def uses_exact_energy(task: Task, model: ModelSpec, dynamics: DynamicsSpec) -> bool:
    """GD on a closed-form task with Gaussian units trains on the exact population energy."""
    return dynamics.algorithm is Algorithm.GD and task.has_closed_form and model.unit is Unit.GAUSSIAN


class DataStream:
    """The batches a pack trains on, shared by all its networks; a function of (data_seed, step) only."""

    def __init__(self, task: Task, dynamics: DynamicsSpec, data_seed: int, exact: bool) -> None:
        self.task = task
        self.dynamics = dynamics
        self.exact = exact
        self.gen = generator(derive_seed(data_seed, DATA_STREAM), task.device)

    def next(self) -> tuple[Tensor, Tensor] | None:
        """(x (P, d), y (P, k)), or None under the exact energy."""
        if self.exact:
            return None
        if self.dynamics.algorithm is Algorithm.GD:
            return self.task.train_set()
        if self.dynamics.finite_set:
            x, y = self.task.train_set()
            idx = torch.randint(0, x.shape[0], (self.dynamics.batch_size,), generator=self.gen, device=x.device)
            return x[idx], y[idx]
        return self.task.sample(self.dynamics.batch_size, self.gen)


def init_particles(
    task: Task, model: ModelSpec, n: int, gen: torch.Generator, *, prior: bool = False
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Draw n particles (z (n, d), b (n,) or None, c (n, k)) from the initial law (or the birth-death
    prior), in this order."""
    d, k = task.dim, task.out_dim
    dev, dt = task.device, task.dtype
    init = model.prior if prior and model.prior is not None else model.init
    if init.z == "uniform":
        z = init.low + (init.high - init.low) * torch.rand(n, d, generator=gen, device=dev, dtype=dt)
    else:
        if init.scale is not None:
            scale = init.scale
        elif model.unit.is_ridge:
            scale = 1.0 / math.sqrt(task.input_sq_norm)
        else:
            scale = task.input_std
        z = init.loc + scale * torch.randn(n, d, generator=gen, device=dev, dtype=dt)
    b = None
    if model.unit.is_ridge and model.bias:
        b = init.bias_std * torch.randn(n, generator=gen, device=dev, dtype=dt)
    if init.c_law == "uniform":
        c = init.c_low + (init.c_high - init.c_low) * torch.rand(n, k, generator=gen, device=dev, dtype=dt)
    else:
        c = init.c_mean + init.c_std * torch.randn(n, k, generator=gen, device=dev, dtype=dt)
    return z, b, c


class _Group:
    """Networks of one width. Invariant: row r of every tensor belongs to ``specs[r]``."""

    def __init__(self, specs: list[NetworkSpec], z: Tensor, b: Tensor | None, c: Tensor,
                 gens: list[torch.Generator]) -> None:
        self.specs = specs
        self.z, self.b, self.c = z, b, c  # (S, n, d), (S, n) | None, (S, n, k)
        self.gens = gens
        self.width = z.shape[1]
        dev, dt = z.device, z.dtype
        self.loss_sum = torch.zeros(len(specs), device=dev, dtype=torch.float64)
        self.bd_kills = torch.zeros(len(specs), device=dev, dtype=torch.long)
        self.bd_clones = torch.zeros(len(specs), device=dev, dtype=torch.long)
        self._vectors(dev, dt)

    def _vectors(self, dev: torch.device, dt: torch.dtype) -> None:
        n = self.width
        mf = [sp.parametrization is Parametrization.MEAN_FIELD for sp in self.specs]
        scale = [1.0 / n if m else 1.0 / math.sqrt(n) for m in mf]
        raw_lr = [sp.lr * n if m else sp.lr for m, sp in zip(mf, self.specs, strict=True)]

        def vec(vals: Sequence[float]) -> Tensor:
            return torch.tensor(list(vals), device=dev, dtype=dt)

        self.out_scale = vec(scale)  # (S,)
        self.raw_lr = vec(raw_lr)  # (S,) eta
        self.move = self.out_scale * self.raw_lr  # (S,) eta * s: dt (mf) or dt / sqrt(n) (ntk)
        self.dt = vec([sp.lr for sp in self.specs])
        self.noise = vec([math.sqrt(2 * sp.lr * sp.temperature) for sp in self.specs])
        self.alpha = vec([sp.bd_rate for sp in self.specs])
        self.prior = torch.tensor([sp.bd_scheme is Scheme.PRIOR for sp in self.specs], device=dev)
        self.any_noise = any(sp.temperature > 0 for sp in self.specs)
        self.any_bd = any(sp.bd_rate > 0 for sp in self.specs)
        # Rows with birth-death and their per-row settings, gathered once (not at every step).
        self.bd_rows = [r for r, sp in enumerate(self.specs) if sp.bd_rate > 0]
        self.bd_idx = None if len(self.bd_rows) == len(self.specs) else \
            torch.tensor(self.bd_rows, device=dev, dtype=torch.long)
        sel = (lambda t: t) if self.bd_idx is None else (lambda t: t[self.bd_idx])
        self.bd_alpha, self.bd_dt, self.bd_prior = sel(self.alpha), sel(self.dt), sel(self.prior)
        self.bd_any_prior = any(self.specs[r].bd_scheme is Scheme.PRIOR for r in self.bd_rows)
        # The vectors at dt itself; a step-size schedule scales copies of them (set_factor).
        self._base = (self.raw_lr, self.move, self.noise, self.bd_dt)
        self.factor = 1.0

    def set_factor(self, factor: float) -> None:
        """Scale every dt-dependent vector to dt(t) = factor * dt (exact: always from the unscaled vectors)."""
        if factor == self.factor:
            return
        raw_lr, move, noise, bd_dt = self._base
        if factor == 1.0:
            self.raw_lr, self.move, self.noise, self.bd_dt = raw_lr, move, noise, bd_dt
        else:
            self.raw_lr, self.move, self.bd_dt = raw_lr * factor, move * factor, bd_dt * factor
            self.noise = noise * math.sqrt(factor)
        self.factor = factor

    @property
    def ids(self) -> list[int]:
        return [sp.net_id for sp in self.specs]

    def keep(self, rows: list[int]) -> None:
        idx = torch.tensor(rows, device=self.z.device, dtype=torch.long)
        self.specs = [self.specs[r] for r in rows]
        self.gens = [self.gens[r] for r in rows]
        self.z, self.c = self.z[idx], self.c[idx]
        self.b = None if self.b is None else self.b[idx]
        self.loss_sum = self.loss_sum[idx]
        self.bd_kills, self.bd_clones = self.bd_kills[idx], self.bd_clones[idx]
        if self.specs:
            self._vectors(self.z.device, self.z.dtype)

    def end_birth_death(self, row: int) -> None:
        """Stop birth-death for one network of the group (its rate becomes 0; the step size stays)."""
        self.specs[row] = dataclasses.replace(self.specs[row], bd_rate=0.0)
        factor = self.factor
        self._vectors(self.z.device, self.z.dtype)
        self.set_factor(factor)


class Pack:
    """Trains a set of networks on one task, one model family and one dynamics, as one particle system.

    Invariants: every running network has exactly ``width`` particles; a network's numbers depend only on
    its own spec, its own random stream (derived from its ``seed``) and the shared data stream (derived from
    ``data_seed``), never on its pack-mates; ``step`` counts completed steps of the running networks.
    """

    def __init__(
        self,
        task: TaskSpec,
        model: ModelSpec,
        dynamics: DynamicsSpec,
        networks: Sequence[NetworkSpec],
        *,
        data_seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        kernel: str = "auto",
        precision: str = "ieee",
        data: SplitArrays | None = None,
    ) -> None:
        """``data``: the prepared arrays of a dataset task (shipped beside the spec, never in it)."""
        if not networks:
            raise ValueError("a pack needs at least one network")
        ids = [sp.net_id for sp in networks]
        if len(set(ids)) != len(ids):
            raise ValueError(f"network ids must be unique within a pack, got duplicates in {ids}")
        self.task_spec, self.model, self.dynamics = task, model, dynamics
        self.networks = tuple(networks)
        self._bd_rate = {sp.net_id: sp.bd_rate for sp in self.networks}
        self.bd_ended: dict[int, int] = {}
        """Plateau rule: networks whose birth-death ended early (stationary under it), and at which step."""
        self.data_seed = data_seed
        self.device = torch.device(device)
        self.dtype = dtype
        self.task = make_task(task, self.device, dtype, data)
        check_compatible(self.task, model, dynamics)
        self.exact = uses_exact_energy(self.task, model, dynamics)
        self.data = DataStream(self.task, dynamics, data_seed, self.exact)
        # Fused Triton kernels for the sampled-loss steps, or None for the torch path (see .kernels).
        self._fused = None if self.exact else kernels.select(
            kernel, precision, device=self.device, dtype=dtype, unit=model.unit.value, bias=model.bias,
            gaussian_var=model.gaussian_var, dim=self.task.dim, out_dim=self.task.out_dim)
        self.step = 0
        self.retired: dict[int, Retired] = {}
        self._pending: list[Retired] = []
        self._steps_since_report = 0
        self.checkpoint_extra: dict[str, int] = {}
        """The ``extra`` of the checkpoint this pack was loaded from (see :meth:`save`); empty otherwise."""
        self.windows: dict[int, Window] = {sp.net_id: Window() for sp in networks}
        """Each running network's final-window reports (bounded: the stopping rule's window)."""
        self.capped: set[int] = set()
        """Networks that reached the step cap: retired (reported) but kept in their group, so a checkpoint
        holds their particles and the run can be extended to more steps (:meth:`extend`)."""
        self.groups: list[_Group] = []
        by_width: dict[int, list[NetworkSpec]] = {}
        for sp in networks:
            by_width.setdefault(sp.width, []).append(sp)
        for width in sorted(by_width):
            specs = by_width[width]
            gens = [generator(derive_seed(sp.seed, NETWORK_STREAM), self.device) for sp in specs]
            parts = [init_particles(self.task, model, width, g) for g in gens]
            z = torch.stack([p[0] for p in parts])
            b = torch.stack([p[1] for p in parts]) if parts[0][1] is not None else None  # type: ignore[misc]
            c = torch.stack([p[2] for p in parts])
            self.groups.append(_Group(specs, z, b, c, gens))

    # ------------------------------------------------------------------ queries
    @property
    def running(self) -> list[int]:
        return [i for g in self.groups for i in g.ids if i not in self.capped]

    @property
    def kernel(self) -> str:
        """What runs the sampled-loss steps now: ``triton`` (fused kernels) or ``torch``."""
        return "torch" if self._fused is None else "triton"

    @property
    def done(self) -> bool:
        return not self.groups or self.step >= self.dynamics.steps

    def _locate(self, net_id: int) -> tuple[_Group, int]:
        for g in self.groups:
            if net_id in g.ids:
                return g, g.ids.index(net_id)
        raise KeyError(f"network {net_id} is not running in this pack")

    def particles(self, net_id: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Copies of a running network's (z (n, d), b (n,) | None, c (n, k))."""
        g, r = self._locate(net_id)
        return g.z[r].clone(), None if g.b is None else g.b[r].clone(), g.c[r].clone()

    def spec(self, net_id: int) -> NetworkSpec:
        g, r = self._locate(net_id)
        return g.specs[r]

    # ------------------------------------------------------------------ math
    def _activations(self, g: _Group, x: Tensor) -> Tensor:
        """phi(x_p; z_i) for every particle of the group: (P, S, n), a view of one (P, S*n) GEMM output.

        The group's particles are flattened into one (S*n, d) matrix so the pre-activation is a single
        dense GEMM; per-network reductions below are einsums over the (P, S, n) view. (Batched matmuls
        with one output column - bmm(h, c) - ran ~10x slower than these on CPU.)
        """
        s, n, d = g.z.shape
        zf = g.z.view(s * n, d)
        unit = self.model.unit
        if unit is Unit.GAUSSIAN:
            var = self.model.gaussian_var
            # -|x - z|^2 / (2 s^2) + log normaliser, as 2 x.z - |z|^2 - |x|^2 in one addmm
            pre = torch.addmm((zf * zf).sum(-1).unsqueeze(0), x, zf.T, beta=-1.0, alpha=2.0)
            pre.sub_((x * x).sum(-1, keepdim=True)).mul_(0.5 / var)
            pre.add_(-0.5 * d * math.log(2 * math.pi * var))
            return pre.exp_().view(-1, s, n)
        pre = x @ zf.T if g.b is None else torch.addmm(g.b.view(1, -1), x, zf.T)
        if unit is Unit.RELU:
            pre.relu_()
        elif unit is Unit.TANH:
            pre.tanh_()
        else:
            pre.sigmoid_()
        return pre.view(-1, s, n)

    @staticmethod
    def _readout(h: Tensor, c: Tensor, scale: Tensor) -> Tensor:
        """f_n per network: (P, S, k) = scale_s sum_i h_psi c_sik."""
        if c.shape[2] == 1:
            out = (h * c[..., 0].unsqueeze(0)).sum(-1, keepdim=True)
        else:
            out = torch.einsum("psn,snk->psk", h, c)
        return out * scale.view(1, -1, 1)

    def _predict_group(self, g: _Group, x: Tensor) -> Tensor:
        if self._fused is not None:
            try:
                return self._fused.predict(g.z, g.b, g.c, g.out_scale, x)
            except kernels.KernelUnavailable as exc:
                self._drop_kernels(exc)
        return self._readout(self._activations(g, x), g.c, g.out_scale).transpose(0, 1)  # (S, P, k)

    def _drop_kernels(self, exc: Exception) -> None:
        kernels.notice(f"{exc}: this pack runs on the torch path")
        self._fused = None

    def _sampled_step(self, g: _Group, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Hand-derived gradient step on a batch; returns (batch losses (S,), potentials V (S, n))."""
        if self._fused is not None:
            try:
                return self._fused.step(g.z, g.b, g.c, g.out_scale, g.move, x, y)
            except kernels.KernelUnavailable as exc:
                self._drop_kernels(exc)
        p = x.shape[0]
        s, n, d = g.z.shape
        h = self._activations(g, x)  # (P, S, n)
        err = self._readout(h, g.c, g.out_scale).sub_(y.unsqueeze(1))  # (P, S, k)
        loss = 0.5 * err.square().sum((0, 2)) / p
        r = err.div_(p)  # dL/df per sample (the output scale enters through `move`)
        if g.c.shape[2] == 1:
            r1 = r[..., 0]  # (P, S)
            hr = torch.einsum("ps,psn->sn", r1, h).unsqueeze(-1)  # (S, n, 1) = E[(f_n - f) phi_i]
            gh = r1.unsqueeze(-1) * g.c[..., 0].unsqueeze(0)  # (P, S, n) = (f_n - f) . c_i
        else:
            hr = torch.einsum("psk,psn->snk", r, h)
            gh = torch.einsum("psk,snk->psn", r, g.c)
        potential = (g.c * hr).sum(-1)  # (S, n)
        unit = self.model.unit
        if unit is Unit.RELU:
            gh = torch.ops.aten.threshold_backward(gh, h, 0.0)
        elif unit is Unit.TANH:
            gh = torch.ops.aten.tanh_backward(gh, h)
        elif unit is Unit.SIGMOID:
            gh = torch.ops.aten.sigmoid_backward(gh, h)
        else:
            gh.mul_(h)
        del h
        move = g.move.view(-1, 1, 1)  # (S, 1, 1) = eta * s
        gz = (gh.reshape(p, s * n).T @ x).view(s, n, d)  # one GEMM for the whole group
        gsum = gh.sum(0)  # (S, n)
        if unit is Unit.GAUSSIAN:
            gz = (gz - g.z * gsum.unsqueeze(-1)) / self.model.gaussian_var  # d phi / d y = phi (x - y) / s^2
        elif g.b is not None:
            g.b.sub_(move.view(-1, 1) * gsum)
        g.z.sub_(move * gz)
        g.c.sub_(move * hr)
        return loss, potential

    def _energy(self, g: _Group, z: Tensor, c: Tensor) -> Tensor:
        """Exact population loss per network (S,): C_f - s sum c F + s^2/2 sum c c K."""
        assert isinstance(self.task, GaussianMixtureTask)
        f_terms, kern, c_f = self.task.energy_terms(z, self.model.gaussian_var)
        c1 = c[..., 0]  # the closed-form task is scalar-valued
        s = g.out_scale
        lin = (c1 * f_terms).sum(-1)
        quad = (c1 * torch.bmm(kern, c1.unsqueeze(-1)).squeeze(-1)).sum(-1)
        return c_f - s * lin + 0.5 * s * s * quad

    def _exact_step(self, g: _Group) -> tuple[Tensor, Tensor]:
        """Gradient step on the exact energy (hand-derived gradients; autograd is the test oracle)."""
        assert isinstance(self.task, GaussianMixtureTask)
        c1 = g.c[..., 0]
        energy, gy, gc = self.task.energy_grad(g.z, c1, g.out_scale, self.model.gaussian_var)
        # V_i = c_i dL/dc_i / s (the first variation of the energy at particle i).
        potential = c1 * gc / g.out_scale.view(-1, 1)
        lr = g.raw_lr.view(-1, 1)
        g.z.sub_(lr.unsqueeze(-1) * gy)
        g.c.sub_((lr * gc).unsqueeze(-1))
        return energy, potential

    def _langevin(self, g: _Group) -> None:
        for r, (sp, gen) in enumerate(zip(g.specs, g.gens, strict=True)):
            if sp.temperature <= 0:
                continue
            std = float(g.noise[r])
            g.z[r].add_(torch.randn(g.z[r].shape, generator=gen, device=g.z.device, dtype=g.z.dtype), alpha=std)
            if g.b is not None:
                g.b[r].add_(torch.randn(g.b[r].shape, generator=gen, device=g.z.device, dtype=g.z.dtype),
                            alpha=std)
            g.c[r].add_(torch.randn(g.c[r].shape, generator=gen, device=g.z.device, dtype=g.z.dtype), alpha=std)

    def _birth_death(self, g: _Group, potential: Tensor) -> None:
        rows = g.bd_rows
        if not rows:
            return
        n = g.width
        idx = g.bd_idx
        uniforms = torch.stack(
            [torch.rand(4, n, generator=g.gens[r], device=g.z.device, dtype=g.z.dtype) for r in rows]
        )
        pot = (potential if idx is None else potential[idx]).to(g.z.dtype)
        dyn = self.dynamics
        rate = (g.bd_alpha, g.bd_dt, dyn.bd_every, dyn.bd_convention is RateConvention.PER_TIME)
        if not g.z.is_cuda and not bool(birth_death.events(pot, rate, uniforms[:, 0]).any()):
            return  # small rates leave most applications empty; the draws above are made all the same
        res = birth_death.resample(pot, rate, uniforms, g.bd_prior)
        if idx is None:
            idx = torch.arange(len(g.specs), device=g.z.device)
        src = res.source
        d, k = g.z.shape[2], g.c.shape[2]
        z_new = torch.gather(g.z[idx], 1, src.unsqueeze(-1).expand(-1, -1, d))
        c_new = torch.gather(g.c[idx], 1, src.unsqueeze(-1).expand(-1, -1, k))
        b_new = None if g.b is None else torch.gather(g.b[idx], 1, src)
        if g.bd_any_prior:
            for j, r in enumerate(rows):
                if g.specs[r].bd_scheme is not Scheme.PRIOR:
                    continue
                slots = res.fresh[j].nonzero().squeeze(1)
                if slots.numel() == 0:
                    continue
                fz, fb, _ = init_particles(self.task, self.model, int(slots.numel()), g.gens[r], prior=True)
                z_new[j, slots] = fz
                if b_new is not None and fb is not None:
                    b_new[j, slots] = fb
                c_new[j, slots] = 0.0
        g.z[idx], g.c[idx] = z_new, c_new
        if g.b is not None and b_new is not None:
            g.b[idx] = b_new
        g.bd_kills[idx] += res.kills
        g.bd_clones[idx] += res.clones

    def _bd_active(self) -> bool:
        d = self.dynamics
        return self.step < d.steps - d.bd_quench and self.step % d.bd_every == 0

    def step_once(self) -> None:
        """One step of every running network."""
        batch = self.data.next()
        bd_now = self._bd_active()
        factor = lr_factor(self.dynamics, self.step)
        for g in self.groups:
            g.set_factor(factor)
            if batch is None:
                loss, potential = self._exact_step(g)
            else:
                loss, potential = self._sampled_step(g, batch[0], batch[1])
            g.loss_sum += loss.to(torch.float64)
            if g.any_noise:
                self._langevin(g)
            if bd_now and g.any_bd:
                self._birth_death(g, potential)
        self.step += 1
        self._steps_since_report += 1

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def test_losses(self) -> dict[int, float]:
        """Held-out loss of every running network (exact population loss where closed form)."""
        out: dict[int, float] = {}
        for g in self.groups:
            vals = self._group_test_loss(g)
            out.update(zip(g.ids, vals.tolist(), strict=True))
        return out

    def _group_test_loss(self, g: _Group) -> Tensor:
        if self.task.has_closed_form and self.model.unit is Unit.GAUSSIAN:
            return self._energy(g, g.z, g.c).to(torch.float64)
        x, y = self.task.test_set()
        s, n = g.z.shape[:2]
        chunk = max(1, min(x.shape[0], (1 << 24) // max(1, s * n)))
        total = torch.zeros(s, device=x.device, dtype=torch.float64)
        for i in range(0, x.shape[0], chunk):
            err = self._predict_group(g, x[i : i + chunk]) - y[i : i + chunk].unsqueeze(0)
            total += err.square().sum((1, 2)).to(torch.float64)
        return 0.5 * total / x.shape[0]

    @torch.no_grad()
    def predict(self, x: Tensor) -> dict[int, Tensor]:
        """f_n(x) (P, k) of every running network."""
        out: dict[int, Tensor] = {}
        for g in self.groups:
            pred = self._predict_group(g, x.to(self.device, self.dtype))
            out.update({i: pred[r] for r, i in enumerate(g.ids)})
        return out

    # ------------------------------------------------------------------ life cycle
    def retire(self, net_id: int, status: NetStatus, reason: str, final_test_loss: float | None = None,
               estimate: Estimate | None = None) -> None:
        """Remove a running network; its pack-mates are untouched."""
        self._drop(net_id)
        self._record(Retired(net_id, self.step, status, reason, final_test_loss, estimate))

    def _drop(self, net_id: int) -> None:
        g, r = self._locate(net_id)
        g.keep([i for i in range(len(g.specs)) if i != r])
        self.groups = [gg for gg in self.groups if gg.specs]
        self.windows.pop(net_id, None)

    def _record(self, rec: Retired) -> None:
        self.retired[rec.net_id] = rec
        self._pending.append(rec)

    def _final_phase(self, net_id: int) -> int:
        """First step of the network's final dynamics once it has begun: where its birth-death ended (early
        under the plateau rule, or at the quench), else 0. Its window never reaches back across that step: a
        loss stationary under birth-death says nothing of the loss after it."""
        if net_id in self.bd_ended:
            return self.bd_ended[net_id]
        d = self.dynamics
        if d.bd_quench > 0 and self._bd_rate[net_id] > 0 and self.step >= d.steps - d.bd_quench:
            return d.steps - d.bd_quench
        return 0

    def _bd_running(self, net_id: int) -> bool:
        """Whether the network still runs birth-death (it has a rate, it has not ended, no quench yet)."""
        d = self.dynamics
        return (self._bd_rate[net_id] > 0 and net_id not in self.bd_ended
                and not (d.bd_quench > 0 and self.step >= d.steps - d.bd_quench))

    def _end_birth_death(self, net_id: int) -> None:
        g, r = self._locate(net_id)
        g.end_birth_death(r)
        self.bd_ended[net_id] = self.step
        self.windows[net_id] = Window()

    def _estimate(self, net_id: int) -> Estimate | None:
        d = self.dynamics
        return self.windows[net_id].estimate(window=d.stop_window, rel_tol=d.stop_rel_tol, z=d.stop_z)

    def _stop(self, last: dict[int, float]) -> None:
        """Retire networks whose test loss is stationary (plateau rule); at the cap, retire every running
        network with its final-window estimate, keeping its particles (see :attr:`capped`)."""
        d = self.dynamics
        if self.step >= d.steps:
            for nid in self.running:
                est = self._estimate(nid)
                verdict = "converged" if est is not None and est.converged else "not converged"
                self._record(Retired(nid, self.step, NetStatus.FINISHED, f"step cap reached ({verdict})",
                                     last[nid], est))
                self.capped.add(nid)
        elif d.stop_rule is StopRule.PLATEAU and self.step >= d.stop_min_steps:
            for nid in self.running:
                est = self._estimate(nid)
                if est is not None and est.converged and self._bd_running(nid):
                    # Stationary under birth-death: birth-death has done its work. It ends here (an adaptive
                    # quench) and the network is judged on what follows.
                    self._end_birth_death(nid)
                elif est is not None and est.converged:
                    self.retire(nid, NetStatus.FINISHED, f"converged at step {self.step}", last[nid], est)

    def extend(self, dynamics: DynamicsSpec) -> None:
        """Raise the step cap to ``dynamics.steps``: networks that reached the old cap without converging train
        on, exactly as if the cap had been the new one all along; those that had converged leave. Only the cap
        and a quench that grows with it (birth-death ends at the same step) may differ."""
        d = self.dynamics
        if dynamics == d:
            return
        same = dataclasses.replace(dynamics, steps=d.steps, bd_quench=d.bd_quench) == d
        # Birth-death that ran to the end goes on; one that stopped (a quench) stops where it stopped.
        bd_end_kept = (dynamics.bd_quench == 0 if d.bd_quench == 0
                       else dynamics.steps - dynamics.bd_quench == d.steps - d.bd_quench)
        if not same or dynamics.steps < d.steps or not bd_end_kept:
            raise ValueError("a checkpointed pack continues only with a larger dynamics.steps (and a quench grown "
                             "by as much); its other dynamics settings cannot change")
        if d.lr_schedule is LrSchedule.COSINE:
            raise ValueError("a run with dynamics.lr_schedule.kind=cosine cannot be extended (the schedule "
                             "depends on the total steps); start a new sweep with more dynamics.steps")
        self.dynamics = dynamics
        self.data.dynamics = self.dynamics
        for nid in sorted(self.capped):
            est = self.retired[nid].estimate
            if est is not None and est.converged:
                self._drop(nid)
            else:
                del self.retired[nid]
        self.capped.clear()

    def report(self) -> Report:
        """Losses of every running network now; retires diverged, converged (plateau rule) and, at the cap,
        finished networks."""
        with torch.no_grad():
            metrics: list[NetMetrics] = []
            events: dict[int, tuple[int, int]] = {}
            diverged: list[tuple[int, float]] = []
            for g in list(self.groups):
                test = self._group_test_loss(g).tolist()
                train = (g.loss_sum / max(1, self._steps_since_report)).tolist()
                kills, clones = g.bd_kills.tolist(), g.bd_clones.tolist()
                for r, nid in enumerate(g.ids):
                    tr = train[r] if self._steps_since_report else None
                    metrics.append(NetMetrics(nid, self.step, tr, test[r]))
                    if g.specs[r].bd_rate > 0:
                        events[nid] = (kills[r], clones[r])
                    for val in (test[r], tr):
                        if val is not None and (not math.isfinite(val) or val > self.dynamics.diverge_threshold):
                            diverged.append((nid, val))
                            break
                g.loss_sum.zero_()
                g.bd_kills.zero_()
                g.bd_clones.zero_()
            self._steps_since_report = 0
            for nid, worst in diverged:
                self.retire(nid, NetStatus.DIVERGED,
                            f"loss {worst:.3g} at step {self.step} (lower dynamics.lr)", None)
            gone = {nid for nid, _ in diverged}
            for m in metrics:
                if m.net_id not in gone:
                    self.windows[m.net_id].add(m.step, m.test_loss, self.dynamics.stop_window,
                                               not_before=self._final_phase(m.net_id))
            self._stop({m.net_id: m.test_loss for m in metrics})
            rec = Report(self.step, tuple(metrics), tuple(self._pending), self.done, events)
            self._pending = []
            return rec

    def train(self) -> Iterator[Report]:
        """Run to the end, yielding a report at step 0 (unless resumed), every ``eval_every`` steps and at the
        last step. A consumer may call :meth:`retire` or :meth:`save` between reports."""
        if self.step == 0 and not self.done:
            yield self.report()
        while not self.done and self.step < self.dynamics.steps:
            self.step_once()
            if self.step % self.dynamics.eval_every == 0 or self.step >= self.dynamics.steps:
                yield self.report()
        if self._pending:
            rec = Report(self.step, (), tuple(self._pending), True)
            self._pending = []
            yield rec

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Full state: particles, accumulators, step, every random stream, and the specs (as JSON). Its size
        does not grow with the number of reports: the reports themselves are not state (the worker appends
        them to a log beside the checkpoint, :mod:`workers.reportlog`)."""
        meta = {
            "task": to_dict(self.task_spec),
            "model": to_dict(self.model),
            "dynamics": to_dict(self.dynamics),
            "networks": [to_dict(sp) for sp in self.networks],
            "data_seed": self.data_seed,
            "dtype": str(self.dtype).removeprefix("torch."),
            "retired": [
                {**to_dict(rec), "status": rec.status.value} for rec in self.retired.values()
            ],
            "pending": [rec.net_id for rec in self._pending],
            "windows": {str(i): w.state() for i, w in self.windows.items()},
            "capped": sorted(self.capped),
            "bd_ended": {str(i): t for i, t in self.bd_ended.items()},
        }
        groups = []
        for g in self.groups:
            groups.append({
                "ids": torch.tensor(g.ids),
                "z": g.z.cpu(), "b": None if g.b is None else g.b.cpu(), "c": g.c.cpu(),
                "loss_sum": g.loss_sum.cpu(), "bd_kills": g.bd_kills.cpu(), "bd_clones": g.bd_clones.cpu(),
                "gens": [gen.get_state() for gen in g.gens],
            })
        return {
            "format": CHECKPOINT_FORMAT,
            "meta": json.dumps(meta),
            "step": self.step,
            "steps_since_report": self._steps_since_report,
            "data_gen": self.data.gen.get_state(),
            "groups": groups,
        }

    def save(self, path: str | os.PathLike[str], extra: Mapping[str, int] | None = None) -> None:
        """Write the state atomically (a crash mid-write leaves the previous checkpoint intact). ``extra``:
        integers the caller keeps with this state (the worker: how much of its report log it covers); they
        come back as :attr:`checkpoint_extra` of the loaded pack."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save({**self.state_dict(), "extra": {k: int(v) for k, v in (extra or {}).items()}}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str = "cpu", *, kernel: str = "auto",
             precision: str = "ieee", data: SplitArrays | None = None) -> Pack:
        """Rebuild a pack from :meth:`save`; continuing it equals an uninterrupted run (bit for bit on CPU with
        the same ``kernel``)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") not in (1, CHECKPOINT_FORMAT):
            raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
        meta = json.loads(state["meta"])
        pack = cls(
            from_dict(TaskSpec, meta["task"]),
            from_dict(ModelSpec, meta["model"]),
            from_dict(DynamicsSpec, meta["dynamics"]),
            [from_dict(NetworkSpec, sp) for sp in meta["networks"]],
            data_seed=meta["data_seed"],
            device=device,
            dtype=getattr(torch, meta["dtype"]),
            kernel=kernel,
            precision=precision,
            data=data,
        )
        pack.load_state_dict(state, meta)
        return pack

    @staticmethod
    def legacy_history(path: str | os.PathLike[str]) -> list[Report] | None:
        """The reports a format-1 checkpoint held (its history); None for a current one, which holds none."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != 1:
            return None
        return [report_from_json(r) for r in json.loads(state["meta"]).get("history", [])]

    def load_state_dict(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        dev = self.device
        specs = {sp.net_id: sp for sp in self.networks}
        self.groups = []
        for gs in state["groups"]:
            ids = [int(i) for i in gs["ids"].tolist()]
            gens = []
            for st in gs["gens"]:
                gen = torch.Generator(device=dev)
                gen.set_state(st)
                gens.append(gen)
            b = None if gs["b"] is None else gs["b"].to(dev)
            g = _Group([specs[i] for i in ids], gs["z"].to(dev), b, gs["c"].to(dev), gens)
            g.loss_sum = gs["loss_sum"].to(dev)
            g.bd_kills, g.bd_clones = gs["bd_kills"].to(dev), gs["bd_clones"].to(dev)
            self.groups.append(g)
        self.step = int(state["step"])
        self._steps_since_report = int(state["steps_since_report"])
        self.data.gen.set_state(state["data_gen"])
        self.checkpoint_extra = {str(k): int(v) for k, v in state.get("extra", {}).items()}
        self.retired = {}
        for rec in meta["retired"]:
            self.retired[rec["net_id"]] = Retired(
                rec["net_id"], rec["step"], NetStatus(rec["status"]), rec["reason"], rec["final_test_loss"],
                estimate_from_json(rec.get("estimate")),
            )
        running = {i for g in self.groups for i in g.ids}
        self.windows = {int(i): Window.from_state(st) for i, st in meta.get("windows", {}).items()
                        if int(i) in running}
        for i in running - set(self.windows):
            self.windows[i] = Window()
        self.capped = set(meta.get("capped", []))
        self.bd_ended = {int(i): int(t) for i, t in meta.get("bd_ended", {}).items()}
        for i in self.bd_ended:
            if i in running:
                g, r = self._locate(i)
                g.end_birth_death(r)
        # Retirements not yet reported when the checkpoint was taken still go out with the next report.
        self._pending = [self.retired[i] for i in meta.get("pending", [])]
