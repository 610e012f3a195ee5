"""Targets and input measures. A task is deterministic given its spec: the same seed gives the same teacher,
couplings, training and test sets on every process."""

from __future__ import annotations

import functools
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .specs import Component, InputDist, Measure, TaskKind, TaskSpec

Tensor = torch.Tensor

#: Example A of docs/science.md: f = (1/3) [N(x;-2,0.5) - 2 N(x;0,1) + N(x;2,0.5)] (second argument = variance).
EXAMPLE_A = (
    Component(1.0 / 3.0, (-2.0,), 0.5),
    Component(-2.0 / 3.0, (0.0,), 1.0),
    Component(1.0 / 3.0, (2.0,), 0.5),
)


def _cpu_gen(seed: int, stream: int) -> torch.Generator:
    # Task randomness is drawn on the CPU so a task is identical on every device.
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63 - 1))


def _sphere(n: int, d: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)


def draw_inputs(dist: InputDist, n: int, d: int, gen: torch.Generator, device: torch.device,
                dtype: torch.dtype) -> Tensor:
    """n inputs from ``dist``: N(0, I_d), uniform on S^(d-1), or uniform on [-1, 1]^d."""
    if dist is InputDist.GAUSSIAN:
        return torch.randn(n, d, generator=gen, device=device, dtype=dtype)
    if dist is InputDist.UNIFORM_BOX:
        return 2.0 * torch.rand(n, d, generator=gen, device=device, dtype=dtype) - 1.0
    return _sphere(n, d, gen, device, dtype)


def input_sq_norm(dist: InputDist, d: int) -> float:
    """E|x|^2 under ``dist``."""
    return {InputDist.GAUSSIAN: float(d), InputDist.SPHERE: 1.0, InputDist.UNIFORM_BOX: d / 3.0}[dist]


def gaussian_overlap(
    a: Tensor, va: float, b: Tensor, vb: float, measure: Measure, measure_var: float
) -> Tensor:
    """Pairwise int N(x; a_i, va I) N(x; b_j, vb I) nu(dx) for a (..., n, d), b (..., m, d) -> (..., n, m).

    Lebesgue nu: N(a; b, (va + vb) I). Gaussian nu = N(0, t I): the product of the two densities is
    N(a; b, v I) N(x; m, g I) with v = va + vb, g = va vb / v, m = (vb a + va b) / v, which integrates
    against nu to N(a; b, v I) N(m; 0, (g + t) I). Distances go through matmuls, never (n, m, d) tensors.
    """
    d = a.shape[-1]
    v = va + vb
    aa = (a * a).sum(-1, keepdim=True)  # (..., n, 1)
    bb = (b * b).sum(-1).unsqueeze(-2)  # (..., 1, m)
    ab = a @ b.transpose(-1, -2)  # (..., n, m)
    dist2 = (aa + bb - 2.0 * ab).clamp_min(0.0)
    log_val = -0.5 * dist2 / v - 0.5 * d * math.log(2 * math.pi * v)
    if measure is Measure.GAUSSIAN:
        g = va * vb / v
        m2 = (vb * vb * aa + va * va * bb + 2.0 * va * vb * ab) / (v * v)
        log_val = log_val - 0.5 * m2 / (g + measure_var) - 0.5 * d * math.log(2 * math.pi * (g + measure_var))
    return torch.exp(log_val)


class Task(ABC):
    """A target f and an input measure nu. Invariants: ``dim``/``out_dim`` fixed; ``test_set`` fixed."""

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self._test: tuple[Tensor, Tensor] | None = None
        self._train: tuple[Tensor, Tensor] | None = None

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def out_dim(self) -> int:
        return self.spec.out_dim

    @property
    def samplable(self) -> bool:
        """Whether fresh samples x ~ nu can be drawn (False for Lebesgue measure and finite datasets)."""
        return True

    @property
    def has_closed_form(self) -> bool:
        """Whether the population loss of Gaussian units is closed form (no sampling noise)."""
        return False

    @property
    def input_sq_norm(self) -> float:
        """E|x|^2 under nu: sets the automatic init scale of ridge units."""
        return 1.0

    @property
    def input_std(self) -> float:
        """Per-coordinate spread of the inputs: sets the automatic init of Gaussian-unit centres."""
        return math.sqrt(self.input_sq_norm / self.dim)

    @abstractmethod
    def target(self, x: Tensor) -> Tensor:
        """f(x) for x (P, d) -> (P, k)."""

    @abstractmethod
    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        """n inputs x ~ nu, on this task's device."""

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """A fresh batch (x, f(x)) drawn with ``gen``."""
        x = self._draw(n, gen)
        return x, self.target(x)

    def _fixed(self, n: int, stream: int) -> tuple[Tensor, Tensor]:
        gen = _cpu_gen(self.spec.seed, stream)
        saved_device = self.device
        self.device = torch.device("cpu")
        try:
            x = self._draw(n, gen)
        finally:
            self.device = saved_device
        x = x.to(self.device)
        return x, self.target(x)

    def train_set(self) -> tuple[Tensor, Tensor]:
        if self._train is None:
            self._train = self._fixed(self.spec.n_train, stream=11)
        return self._train

    def test_set(self) -> tuple[Tensor, Tensor]:
        if self._test is None:
            self._test = self._fixed(self.spec.n_test, stream=12)
        return self._test


class TeacherTask(Task):
    """Student-teacher: f(x) = sum_j c_j relu(w_j . x) with |w_j| = 1 and |c_j| = 1 (so |w_j||c_j| = 1)."""

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(spec, device, dtype)
        gen = _cpu_gen(spec.seed, 1)
        w = _sphere(spec.teacher_units, spec.dim, gen, torch.device("cpu"), dtype)
        c = torch.randn(spec.teacher_units, spec.out_dim, generator=gen, dtype=dtype)
        c = c / c.norm(dim=1, keepdim=True)
        self.w = w.to(device)  # (m, d)
        self.c = c.to(device)  # (m, k)

    @property
    def input_sq_norm(self) -> float:
        return input_sq_norm(self.spec.inputs, self.dim)

    def target(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.w.T) @ self.c

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        return draw_inputs(self.spec.inputs, n, self.dim, gen, self.device, self.dtype)


class Spherical3SpinTask(Task):
    """Continuous 3-spin energy f(x) = sum_pqr a_pqr x_p x_q x_r, a_pqr ~ N(0, 1), x uniform on S^(d-1)."""

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(spec, device, dtype)
        d = spec.dim
        a = torch.randn(d, d * d, generator=_cpu_gen(spec.seed, 2), dtype=dtype)
        self.a = a.to(device)  # (d, d*d): row p, column (q, r)

    @property
    def out_dim(self) -> int:
        return 1

    def target(self, x: Tensor) -> Tensor:
        p, d = x.shape
        xa = (x @ self.a).view(p, d, d)  # sum_p x_p a_pqr -> (P, d, d)
        return torch.einsum("bqr,bq,br->b", xa, x, x).unsqueeze(1)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        return _sphere(n, self.dim, gen, self.device, self.dtype)


class GaussianMixtureTask(Task):
    """f(x) = sum_m a_m N(x; mu_m, v_m I). With Gaussian units F, K and C_f are exact (see gaussian_overlap)."""

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(spec, device, dtype)
        comps = spec.components or EXAMPLE_A
        if not spec.components and spec.dim != 1:
            # Default target in d dimensions: example A's profile along the first axis.
            comps = tuple(Component(c.weight, c.mean + (0.0,) * (spec.dim - 1), c.var) for c in comps)
        self.components = comps
        self.weights = torch.tensor([c.weight for c in comps], device=device, dtype=dtype)  # (M,)
        self.means = torch.tensor([c.mean for c in comps], device=device, dtype=dtype)  # (M, d)
        self.vars = [c.var for c in comps]

    @property
    def out_dim(self) -> int:
        return 1

    @property
    def samplable(self) -> bool:
        return self.spec.measure is Measure.GAUSSIAN

    @property
    def has_closed_form(self) -> bool:
        return True

    @property
    def input_sq_norm(self) -> float:
        if self.spec.measure is Measure.GAUSSIAN:
            return self.dim * self.spec.measure_std**2
        # Lebesgue: use the spread of the target's centres (init of Gaussian units covers them).
        spread = float(self.means.abs().max()) if self.means.numel() else 1.0
        return self.dim * max(spread, 1.0) ** 2

    def target(self, x: Tensor) -> Tensor:
        out = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        d = x.shape[1]
        for a, mu, v in zip(self.weights, self.means, self.vars, strict=True):
            sq = ((x - mu) ** 2).sum(1)
            out = out + a * torch.exp(-0.5 * sq / v - 0.5 * d * math.log(2 * math.pi * v))
        return out.unsqueeze(1)

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        if self.spec.measure is not Measure.GAUSSIAN:
            raise ValueError(
                "the Gaussian-mixture task on Lebesgue measure cannot be sampled; "
                "use dynamics.algorithm=gd with gaussian units (exact energy) or set task.measure=gaussian"
            )
        return self.spec.measure_std * torch.randn(n, self.dim, generator=gen, device=self.device, dtype=self.dtype)

    def _overlap(self, a: Tensor, va: float, b: Tensor, vb: float) -> Tensor:
        return gaussian_overlap(a, va, b, vb, self.spec.measure, self.spec.measure_std**2)

    def energy_terms(self, centres: Tensor, unit_var: float) -> tuple[Tensor, Tensor, float]:
        """For Gaussian units with centres (S, n, d): F (S, n), K (S, n, n) and the constant C_f."""
        f_terms = torch.zeros(centres.shape[:-1], device=centres.device, dtype=centres.dtype)
        for a, mu, v in zip(self.weights, self.means, self.vars, strict=True):
            f_terms = f_terms + a * self._overlap(centres, unit_var, mu.view(1, 1, -1), v).squeeze(-1)
        kern = self._overlap(centres, unit_var, centres, unit_var)
        return f_terms, kern, self.c_f

    def energy_grad(self, y: Tensor, c: Tensor, s: Tensor, unit_var: float) -> tuple[Tensor, Tensor, Tensor]:
        """Hand-derived exact energy and its gradients for Gaussian units (k = 1).

        y (S, n, d) centres, c (S, n) weights, s (S,) output scales. With O(a, b) = gaussian_overlap,
        grad_a O = O * [-(a - b)/v - (vb/v) m/(g + t)] (the second term only under a Gaussian measure), so
        dL/dc_i = -s F_i + s^2 (K c)_i and dL/dy_i = -s c_i grad F_i + s^2 c_i sum_j c_j grad_1 K_ij.
        Returns (L (S,), dL/dy (S, n, d), dL/dc (S, n)).
        """
        gauss = self.spec.measure is Measure.GAUSSIAN
        t = self.spec.measure_std**2
        f_val = torch.zeros(y.shape[:-1], device=y.device, dtype=y.dtype)  # (S, n)
        f_grad = torch.zeros_like(y)  # (S, n, d)
        for a, mu, v in zip(self.weights, self.means, self.vars, strict=True):
            ov = a * self._overlap(y, unit_var, mu.view(1, 1, -1), v).squeeze(-1)  # (S, n)
            vt = unit_var + v
            coef = (y - mu) / vt
            if gauss:
                g = unit_var * v / vt
                coef = coef + (v / vt) * ((v * y + unit_var * mu) / vt) / (g + t)
            f_val = f_val + ov
            f_grad = f_grad - ov.unsqueeze(-1) * coef
        kern = self._overlap(y, unit_var, y, unit_var)  # (S, n, n)
        kc = torch.bmm(kern, c.unsqueeze(-1)).squeeze(-1)  # (S, n)
        kcy = torch.bmm(kern, c.unsqueeze(-1) * y)  # (S, n, d) = sum_j K_ij c_j y_j
        # sum_j c_j grad_1 K_ij = -[y_i (Kc)_i - (K (c y))_i] / (2 s^2)  [- (y_i (Kc)_i + (K (c y))_i) / (4 (g + t))]
        yk = y * kc.unsqueeze(-1)
        k_grad = -(yk - kcy) / (2 * unit_var)
        if gauss:
            k_grad = k_grad - (yk + kcy) / (4 * (unit_var / 2 + t))
        s1 = s.view(-1, 1)
        energy = self.c_f - s * (c * f_val).sum(-1) + 0.5 * s * s * (c * kc).sum(-1)
        grad_c = -s1 * f_val + s1 * s1 * kc
        grad_y = c.unsqueeze(-1) * (-s1.unsqueeze(-1) * f_grad + (s1 * s1).unsqueeze(-1) * k_grad)
        return energy, grad_y, grad_c

    @functools.cached_property
    def c_f(self) -> float:
        total = 0.0
        for a, mu, v in zip(self.weights, self.means, self.vars, strict=True):
            for a2, mu2, v2 in zip(self.weights, self.means, self.vars, strict=True):
                ov = self._overlap(mu.view(1, -1), v, mu2.view(1, -1), v2)
                total += float(a * a2 * ov)
        return 0.5 * total


class DigitsTask(Task):
    """scikit-learn's bundled 8x8 digits (1797 images): 64 standardised features, one-hot targets (k = 10).

    A 75/25 train/test split drawn from ``seed``; SGD batches come from the training set.
    """

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(spec, device, dtype)
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.as_tensor(data.data, dtype=torch.float64)
        y = torch.nn.functional.one_hot(torch.as_tensor(data.target), 10).to(torch.float64)
        perm = torch.randperm(x.shape[0], generator=_cpu_gen(spec.seed, 3))
        n_train = int(0.75 * x.shape[0])
        tr, te = perm[:n_train], perm[n_train:]
        mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
        x = (x - mean) / std / math.sqrt(64)  # unit mean squared norm
        self._train = (x[tr].to(device, dtype), y[tr].to(device, dtype))
        self._test = (x[te].to(device, dtype), y[te].to(device, dtype))

    @property
    def dim(self) -> int:
        return 64

    @property
    def out_dim(self) -> int:
        return 10

    @property
    def samplable(self) -> bool:
        return False

    def target(self, x: Tensor) -> Tensor:
        raise ValueError("the digits task has no target function off its data; use its train/test sets")

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        raise ValueError("the digits task is a finite dataset; set dynamics.finite_set=true for sgd")


#: The prepared arrays of a dataset task: x_train (N, d), y_train (N, k), x_test (M, d), y_test (M, k).
SplitArrays = Mapping[str, Any]
SPLIT_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DatasetTask(Task):
    """The user's finite dataset. The driver reads, splits and standardises it once and ships the arrays
    (``data``); without them the task still knows its sizes (planning) but has no samples."""

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype,
                 data: SplitArrays | None = None) -> None:
        super().__init__(spec, device, dtype)
        self._sq_norm = 1.0
        if data is not None:
            missing = [k for k in SPLIT_KEYS if k not in data]
            if missing:
                raise ValueError(f"dataset arrays lack {missing}")
            # Copies: arrays from Ray's object store are read-only views.
            t = {k: torch.tensor(data[k], dtype=torch.float64) for k in SPLIT_KEYS}
            for split in ("train", "test"):
                x, y = t[f"x_{split}"], t[f"y_{split}"]
                if x.shape[1:] != (spec.dim,) or y.shape[1:] != (spec.out_dim,):
                    raise ValueError(f"dataset {split} arrays {tuple(x.shape)}/{tuple(y.shape)} do not match the "
                                     f"spec (dim {spec.dim}, out_dim {spec.out_dim}); the data changed")
            self._train = (t["x_train"].to(device, dtype), t["y_train"].to(device, dtype))
            self._test = (t["x_test"].to(device, dtype), t["y_test"].to(device, dtype))
            self._sq_norm = max(float(t["x_train"].pow(2).sum(1).mean()), 1e-12)

    @property
    def samplable(self) -> bool:
        return False

    @property
    def input_sq_norm(self) -> float:
        return self._sq_norm

    def train_set(self) -> tuple[Tensor, Tensor]:
        if self._train is None:
            raise ValueError("the dataset's arrays were not shipped with this pack (PackJob.data is empty)")
        return self._train

    def test_set(self) -> tuple[Tensor, Tensor]:
        if self._test is None:
            raise ValueError("the dataset's arrays were not shipped with this pack (PackJob.data is empty)")
        return self._test

    def target(self, x: Tensor) -> Tensor:
        raise ValueError("a dataset task has no target function off its data; use its train/test sets")

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        raise ValueError("a dataset task is finite; set dynamics.finite_set=true for sgd")


def import_target(target: str) -> Callable[[Tensor], Tensor]:
    """The callable named 'package.module:function' (ImportError/AttributeError/TypeError when it is not)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task.target must look like 'package.module:function', got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


class FunctionTask(Task):
    """The user's target f on a (P, d) tensor, (P,) or (P, k) out; inputs from ``spec.inputs``. Fresh samples
    for online SGD, the fixed train/test sets otherwise. The module is imported on the worker (on a
    cluster it arrives through Ray's runtime environment)."""

    def __init__(self, spec: TaskSpec, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(spec, device, dtype)
        self.fn = import_target(spec.target)

    @property
    def input_sq_norm(self) -> float:
        return input_sq_norm(self.spec.inputs, self.dim)

    def target(self, x: Tensor) -> Tensor:
        y = torch.as_tensor(self.fn(x), device=x.device, dtype=x.dtype)
        y = y.unsqueeze(1) if y.dim() == 1 else y
        if y.shape != (x.shape[0], self.out_dim):
            raise ValueError(f"{self.spec.target} returned shape {tuple(y.shape)} for inputs {tuple(x.shape)}; "
                             f"expected ({x.shape[0]},) or ({x.shape[0]}, {self.out_dim})")
        return y

    def _draw(self, n: int, gen: torch.Generator) -> Tensor:
        return draw_inputs(self.spec.inputs, n, self.dim, gen, self.device, self.dtype)


_KINDS: dict[TaskKind, type[Task]] = {
    TaskKind.TEACHER: TeacherTask,
    TaskKind.SPHERICAL_3SPIN: Spherical3SpinTask,
    TaskKind.GAUSSIAN_MIXTURE: GaussianMixtureTask,
    TaskKind.DIGITS: DigitsTask,
    TaskKind.FUNCTION: FunctionTask,
}


def make_task(spec: TaskSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              data: SplitArrays | None = None) -> Task:
    """Build the task named by ``spec.kind`` on ``device``; ``data`` carries a dataset task's arrays."""
    if TaskKind(spec.kind) is TaskKind.DATASET:
        return DatasetTask(spec, torch.device(device), dtype, data)
    return _KINDS[TaskKind(spec.kind)](spec, torch.device(device), dtype)
