"""Error-vs-width analysis: which points are converged, the power-law and floor fits, the regime, the plots.

The law a sweep measures is a long-time law (docs/science.md): at t -> infinity the loss of a width-n network
scales as n^-alpha. A network still descending when its run ended measures its training time, not its width,
so the exponent (`power`) is fitted on converged points only, weighted by their standard errors, with a 95%
bootstrap interval over seeds; where the losses bend toward a floor, L(n) = A n^-alpha + L_inf is fitted too.
The rules (weights, bootstrap, floor visibility, regime) are described in docs/analysis.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = ["Fit", "FloorFit", "Point", "VariantAnalysis", "analyse", "curves_figure", "fit_scaling",
           "plot_curves", "plot_scaling", "scaling_figure"]

FINISHED = "finished"
REL_SE_FLOOR = 0.01
"""Smallest relative standard error a weight assumes: a point with se=0 counts as 1% noise, not infinite weight."""
FLOOR_MIN_WIDTHS = 4
"""The floor model has 3 parameters; it needs at least one width more to have a residual."""
FLOOR_MIN_SHARE = 0.01
"""A floor is visible when its interval's lower end is at least this share of the smallest per-width loss."""
FLOOR_MAX_P = 0.05
"""A floor must beat the pure power law at this level of the nested F-test."""
FLOOR_MIN_BOOT_OK = 0.8
"""Share of bootstrap replicates whose floor fit must succeed for the intervals to be trusted."""
ALPHA_MAX = 10.0
"""Upper bound on the floor model's exponent; keeps the fit away from a step function."""
WIDTH_LIMITED_SHARE = 0.9
TIME_LIMITED_SHARE = 0.5
REGIMES = ("width-limited", "time-limited", "mixed")


@dataclass(frozen=True, slots=True)
class Point:
    """Final result of one network (slots: a report holds one per network, 100k+ in a large sweep)."""

    width: int
    """Number of particles (hidden units) n."""
    seed: int
    """Replicate index; the bootstrap resamples whole seeds."""
    test_loss: float | None
    """Test loss: the mean over the final window (older results: the last evaluation); None when none."""
    status: str
    """Network status; only "finished" points enter the fits."""
    se: float | None = None
    """Standard error of ``test_loss`` over the final window; None when unknown."""
    converged: bool | None = None
    """Whether the loss was stationary when the run ended; None (older results) counts as not converged."""


@dataclass(frozen=True)
class Fit:
    """loss ~ prefactor * width**exponent, fitted by (weighted) least squares in log-log space."""

    exponent: float
    """Slope of log(loss) on log(width)."""
    exponent_ci95: tuple[float, float]
    """95% percentile bootstrap interval of the exponent (over seeds; over points with a single seed)."""
    prefactor: float
    """exp(intercept): the fitted loss at width 1."""
    r2: float
    """Coefficient of determination of the (weighted) log-log fit."""
    n_points: int
    """Points used (finished, finite positive loss)."""
    n_seeds: int
    """Distinct seeds among the points used."""
    weighted: bool = False
    """True when the points were weighted by their standard errors (see `_log_weights`)."""
    widths: tuple[int, ...] = ()
    """Distinct widths among the points used, ascending."""


@dataclass(frozen=True)
class FloorFit:
    """loss ~ amplitude * width**-alpha + l_inf, fitted in log space; present only where a floor is visible."""

    alpha: float
    alpha_ci95: tuple[float, float]
    l_inf: float
    l_inf_ci95: tuple[float, float]
    amplitude: float
    n_points: int
    n_boot_ok: int
    """Bootstrap replicates whose fit succeeded (the intervals' sample)."""
    weighted: bool
    widths: tuple[int, ...]


def _usable(points: Sequence[Point]) -> list[Point]:
    return [p for p in points if p.status == FINISHED and p.test_loss is not None
            and math.isfinite(p.test_loss) and p.test_loss > 0 and p.width > 0]


def _arrays(pts: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    """(widths, losses) as float arrays, (P,) each; ``pts`` must come from _usable."""
    widths = np.array([p.width for p in pts], dtype=np.float64)
    losses = np.array([p.test_loss for p in pts], dtype=np.float64)
    return widths, losses


def _log_weights(pts: Sequence[Point]) -> np.ndarray | None:
    """Inverse variance of log(loss) per point, (P,): var(log mean) ~ (se/mean)^2, floored at REL_SE_FLOOR.

    None (fit unweighted) unless every point has a finite se >= 0: weighting half the points by their se and
    the rest by a guess would make the guess decide the fit."""
    se = [p.se for p in pts]
    if not pts or any(s is None or not math.isfinite(s) or s < 0 for s in se):
        return None
    rel = np.array(se, dtype=np.float64) / _arrays(pts)[1]
    return 1.0 / np.maximum(rel, REL_SE_FLOOR) ** 2


def _units(pts: Sequence[Point]) -> tuple[np.ndarray, int, int]:
    """(unit index per point, number of units, number of seeds): the bootstrap resamples seeds (each drawn
    seed brings all its widths, so one seed's correlated points count once), or points with a single seed."""
    seeds = sorted({p.seed for p in pts})
    if len(seeds) >= 2:
        index = {s: i for i, s in enumerate(seeds)}
        return np.array([index[p.seed] for p in pts]), len(seeds), len(seeds)
    return np.arange(len(pts)), len(pts), len(seeds)


def _resampled(n_units: int, n_boot: int, seed: int, *per_unit: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each per-unit table summed over every bootstrap replicate's draws: ``counts @ table``, (n_boot, ...),
    where ``counts[b, u]`` is how often unit u is drawn in replicate b. The counts are drawn a block of
    replicates at a time (the same stream as all at once), so memory stays flat as units grow (100k networks
    are 10k seeds: 160 MB of counts at once)."""
    rng = np.random.default_rng(seed)
    p = np.full(n_units, 1.0 / n_units)
    block = max(1, (1 << 20) // n_units)
    parts: list[list[np.ndarray]] = [[] for _ in per_unit]
    for start in range(0, n_boot, block):
        counts = rng.multinomial(n_units, p, size=min(block, n_boot - start))
        for acc, table in zip(parts, per_unit, strict=True):
            acc.append(counts @ table)
    return tuple(np.concatenate(acc) for acc in parts)


def _ci(samples: np.ndarray) -> tuple[float, float]:
    if samples.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return (float(lo), float(hi))


def _power_fit(pts: Sequence[Point], w: np.ndarray | None, *, n_boot: int, seed: int) -> Fit:
    """Weighted least squares of log(loss) on log(width) with a seed bootstrap; ``pts`` from _usable."""
    widths_arr, losses = _arrays(pts)
    x, y = np.log(widths_arr), np.log(losses)
    wt = np.ones_like(x) if w is None else w
    xm, ym = np.average(x, weights=wt), np.average(y, weights=wt)
    dx, dy = x - xm, y - ym
    slope = float((wt * dx) @ dy / ((wt * dx) @ dx))
    intercept = float(ym - slope * xm)
    ss_res = float(wt @ (dy - slope * dx) ** 2)
    ss_tot = float(wt @ dy ** 2)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0

    # Per unit we keep the weighted sums that determine a WLS slope, so all replicates are one
    # (n_boot, units) @ (units, 5) product. Centred sums keep the normal equations well conditioned.
    unit_of, n_units, n_seeds = _units(pts)
    cols = wt[:, None] * np.stack([np.ones_like(dx), dx, dy, dx * dx, dx * dy], axis=1)  # (P, 5)
    sums = np.zeros((n_units, 5))
    np.add.at(sums, unit_of, cols)
    (boot,) = _resampled(n_units, n_boot, seed, sums)
    s, sx, sy, sxx, sxy = boot.T  # each (B,)
    den = s * sxx - sx * sx
    ok = den > 1e-12 * np.maximum(s * sxx, 1e-300)  # a replicate with a single width has no slope
    slopes = (s[ok] * sxy[ok] - sx[ok] * sy[ok]) / den[ok]
    return Fit(exponent=slope, exponent_ci95=_ci(slopes), prefactor=math.exp(intercept), r2=r2,
               n_points=len(pts), n_seeds=n_seeds, weighted=w is not None,
               widths=tuple(sorted({p.width for p in pts})))


def fit_scaling(points: Sequence[Point], *, n_boot: int = 2000, seed: int = 0, weighted: bool = False) -> Fit:
    """Fit loss ~ prefactor * width**exponent over finished points with finite positive loss.

    Convergence is not looked at: this is the plain fit (`analyse` is the one that knows the regime).
    ``weighted=True`` weights the points by their standard errors when every point has one (`_log_weights`).
    Raises ValueError with fewer than 2 distinct widths.
    """
    pts = _usable(points)
    widths = sorted({p.width for p in pts})
    if len(widths) < 2:
        raise ValueError(f"fit_scaling needs finished points with finite positive test loss at >= 2 distinct "
                         f"widths; got {len(pts)} usable of {len(points)} points at widths {widths}")
    return _power_fit(pts, _log_weights(pts) if weighted else None, n_boot=n_boot, seed=seed)


# ---------------------------------------------------------------------------------------------- floor model
def _floor_model(p: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(A n^-alpha + L) and its Jacobian in (log A, alpha, L), for p = (log A, alpha, L)."""
    power = np.exp(p[0] - p[1] * np.log(n))
    total = power + p[2]
    jac = np.stack([power / total, -np.log(n) * power / total, 1.0 / total], axis=1)
    return np.log(total), jac


def _floor_solve(n: np.ndarray, wsum: np.ndarray, ymean: np.ndarray, p0: np.ndarray) -> np.ndarray | None:
    """Weighted least squares of the floor model on per-width data: sum_k W_k (f(n_k) - Y_k)^2 has the same
    minimum as the per-point sum, so each replicate fits one residual per width. None if it fails."""
    root = np.sqrt(wsum)

    def residual(p: np.ndarray) -> np.ndarray:
        return root * (_floor_model(p, n)[0] - ymean)

    def jacobian(p: np.ndarray) -> np.ndarray:
        return root[:, None] * _floor_model(p, n)[1]

    lower, upper = np.array([-np.inf, 0.0, 0.0]), np.array([np.inf, ALPHA_MAX, np.inf])
    x0 = np.clip(p0, lower + 1e-9, upper - 1e-9)
    try:
        from scipy.optimize import least_squares  # scipy loads only when a fit runs (start-up)

        res = least_squares(residual, x0, jac=jacobian, bounds=(lower, upper), method="trf", x_scale="jac")
    except (ValueError, FloatingPointError):
        return None
    return res.x if res.success and np.all(np.isfinite(res.x)) else None


def _floor_start(n: np.ndarray, wsum: np.ndarray, ymean: np.ndarray) -> np.ndarray | None:
    """Best of a few starts: L0 a share of the smallest loss, (A0, alpha0) from a line through log(L - L0)."""
    best, best_cost = None, math.inf
    lmin = float(np.exp(ymean.min()))
    for share in (0.05, 0.5, 0.9):
        excess = np.log(np.exp(ymean) - share * lmin)
        slope, intercept = np.polyfit(np.log(n), excess, 1, w=np.sqrt(wsum))
        p = _floor_solve(n, wsum, ymean, np.array([intercept, min(max(-slope, 0.05), ALPHA_MAX / 2),
                                                   share * lmin]))
        if p is not None:
            cost = float(wsum @ (_floor_model(p, n)[0] - ymean) ** 2)
            if cost < best_cost:
                best, best_cost = p, cost
    return best


def _floor_p_value(p: np.ndarray, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """p-value of the nested F-test "floor model vs pure power law" on the points (x = log n, y = log loss,
    weights w): the within-width scatter of the seeds sits in the floor model's residual, so a bend only
    counts when it stands out of that scatter. F(1, P-3) is conservative here, since L_inf = 0 lies on the
    boundary of the floor model's range."""
    dof = len(y) - 3
    rss_floor = float(w @ (_floor_model(p, np.exp(x))[0] - y) ** 2)
    design = np.stack([np.ones_like(x), x], axis=1) * np.sqrt(w)[:, None]
    coef = np.linalg.lstsq(design, y * np.sqrt(w), rcond=None)[0]
    rss_power = float(w @ (coef[0] + coef[1] * x - y) ** 2)
    if dof < 1 or rss_power <= rss_floor:
        return 1.0
    if rss_floor <= 1e-14 * rss_power:  # noiseless data that bend: an exact floor
        return 0.0
    from scipy.stats import f as f_dist

    return float(f_dist.sf((rss_power - rss_floor) / (rss_floor / dof), 1, dof))


def _floor_fit(pts: Sequence[Point], w: np.ndarray | None, *, n_boot: int,
               seed: int) -> tuple[FloorFit | None, str]:
    """The floor fit where a floor is visible (docs/analysis.md), else None and the reason in words."""
    widths = sorted({p.width for p in pts})
    if len(widths) < FLOOR_MIN_WIDTHS:
        return None, f"not fitted: {len(widths)} converged widths, the floor model needs >= {FLOOR_MIN_WIDTHS}"
    col = np.array([widths.index(p.width) for p in pts])
    wt = np.ones(len(pts)) if w is None else w
    y = np.log(_arrays(pts)[1])
    unit_of, n_units, _ = _units(pts)
    w_uk = np.zeros((n_units, len(widths)))  # per (unit, width): sum of weights and of weighted log loss
    wy_uk = np.zeros_like(w_uk)
    np.add.at(w_uk, (unit_of, col), wt)
    np.add.at(wy_uk, (unit_of, col), wt * y)
    n = np.array(widths, dtype=np.float64)
    wsum = w_uk.sum(axis=0)
    p = _floor_start(n, wsum, wy_uk.sum(axis=0) / wsum)
    if p is None:
        return None, "not visible: the floor model did not converge"
    p_value = _floor_p_value(p, np.log(n)[col], y, wt)
    if not p_value < FLOOR_MAX_P:
        return None, (f"not visible: the floor model fits no better than a pure power law "
                      f"(F-test p = {p_value:.2g} >= {FLOOR_MAX_P})")
    boot_w, boot_wy = _resampled(n_units, n_boot, seed, w_uk, wy_uk)  # (B, K)
    samples = []
    for bw, bwy in zip(boot_w, boot_wy, strict=True):
        keep = bw > 0
        if keep.sum() >= FLOOR_MIN_WIDTHS:
            q = _floor_solve(n[keep], bw[keep], bwy[keep] / bw[keep], p)
            if q is not None:
                samples.append(q)
    boot = np.array(samples).reshape(-1, 3)
    l_ci = _ci(boot[:, 2])
    lmin = float(np.exp((wy_uk.sum(axis=0) / wsum).min()))
    if len(boot) < FLOOR_MIN_BOOT_OK * n_boot:
        return None, f"not visible: only {len(boot)}/{n_boot} bootstrap fits converged"
    if not l_ci[0] >= FLOOR_MIN_SHARE * lmin:
        return None, (f"not visible: L_inf {p[2]:.3g}, its 95% interval [{l_ci[0]:.3g}, {l_ci[1]:.3g}] "
                      f"reaches below {FLOOR_MIN_SHARE:.0%} of the smallest loss")
    return FloorFit(alpha=float(p[1]), alpha_ci95=_ci(boot[:, 1]), l_inf=float(p[2]), l_inf_ci95=l_ci,
                    amplitude=math.exp(p[0]), n_points=len(pts), n_boot_ok=len(boot), weighted=w is not None,
                    widths=tuple(widths)), "visible"


# ------------------------------------------------------------------------------------------ the analysis
def _regime(pts: Sequence[Point]) -> str | None:
    """width-limited / time-limited / mixed from the converged share (docs/analysis.md); None without points."""
    if not pts:
        return None
    share = sum(p.converged is True for p in pts) / len(pts)
    widest = max(p.width for p in pts)  # once: inside the comprehension it made this quadratic (minutes at 100k points)
    top = [p for p in pts if p.width == widest]
    top_share = sum(p.converged is True for p in top) / len(top)
    n_conv_widths = len({p.width for p in pts if p.converged is True})
    if share < TIME_LIMITED_SHARE or n_conv_widths < 2:
        return "time-limited"
    if share >= WIDTH_LIMITED_SHARE and top_share >= 0.5:
        return "width-limited"
    return "mixed"


def _num(x: float) -> float | None:
    """JSON holds no NaN or infinity: those become null."""
    return float(x) if math.isfinite(x) else None


def _fit_json(fit: Fit | None) -> dict[str, Any] | None:
    if fit is None:
        return None
    return {"exponent": _num(fit.exponent), "exponent_ci95": [_num(v) for v in fit.exponent_ci95],
            "prefactor": _num(fit.prefactor), "r2": _num(fit.r2), "n_points": fit.n_points,
            "n_seeds": fit.n_seeds, "weighted": fit.weighted, "widths": list(fit.widths)}


@dataclass(frozen=True)
class VariantAnalysis:
    """Everything the sweep reports about one variant's error-vs-width data."""

    points: tuple[Point, ...]
    """Every point given, usable or not (the plots draw the usable ones)."""
    n_points: int
    """Finished points with a finite positive loss."""
    n_converged: int
    """Of those, points with converged=True."""
    n_unknown: int
    """Of those, points with converged=None (older results): counted as not converged."""
    regime: str | None
    """"width-limited", "time-limited" or "mixed" (docs/analysis.md); None without usable points."""
    power: Fit | None
    """Exponent on converged points, weighted by their se; None with < 2 converged widths."""
    power_all: Fit | None
    """Unweighted fit over every usable point, converged or not: the pre-convergence number, for comparison."""
    floor: FloorFit | None
    """L = A n^-alpha + L_inf on converged points, only where a floor is visible."""
    floor_note: str
    """Why the floor is absent ("not fitted: ..." / "not visible: ...") or "visible"."""

    def verdict(self) -> str:
        """One plain-words line for the console."""
        nc, n = self.n_converged, self.n_points
        if n == 0:
            return "no finished points with a positive test loss: nothing to fit"
        slope_all = f"{self.power_all.exponent:+.2f}" if self.power_all else "n/a"
        if self.n_unknown == n:
            return (f"convergence not recorded for these {n} points (older results): "
                    f"the all-points slope {slope_all} is not known to be the long-time law")
        if self.regime == "time-limited" or self.power is None:
            known = ""
            if self.power is not None:
                f = self.power
                known = (f" (converged-only exponent {f.exponent:+.2f} [{f.exponent_ci95[0]:+.2f}, "
                         f"{f.exponent_ci95[1]:+.2f}] over widths {f.widths[0]}..{f.widths[-1]} only)")
            return (f"time-limited: only {nc}/{n} points converged{known}; the all-points slope {slope_all} "
                    f"is not the law; train longer")
        f = self.power
        power = (f"exponent {f.exponent:+.2f} [{f.exponent_ci95[0]:+.2f}, {f.exponent_ci95[1]:+.2f}] "
                 f"on {nc}/{n} converged points (widths {f.widths[0]}..{f.widths[-1]})")
        if self.floor is not None:  # the pure power law is bent by the floor: the floor model is the law
            fl = self.floor
            law = (f"floor visible: L = A n^-{fl.alpha:.2f} [{fl.alpha_ci95[0]:.2f}, {fl.alpha_ci95[1]:.2f}] "
                   f"+ {fl.l_inf:.3g} [{fl.l_inf_ci95[0]:.3g}, {fl.l_inf_ci95[1]:.3g}] on {nc}/{n} converged "
                   f"points (pure power exponent {self.power.exponent:+.2f}, bent by the floor)")
        else:
            law = power
        if self.regime == "width-limited":
            return f"width-limited, the long-time law: {law}"
        return (f"mixed: {law}; the all-points slope {slope_all} includes unconverged points; "
                f"train longer for the law at the largest widths")

    def to_json(self) -> dict[str, Any]:
        """The summary.json fields of this variant: plain JSON (NaN and infinities become null)."""
        floor = None
        if self.floor is not None:
            f = self.floor
            floor = {"alpha": _num(f.alpha), "alpha_ci95": [_num(v) for v in f.alpha_ci95],
                     "l_inf": _num(f.l_inf), "l_inf_ci95": [_num(v) for v in f.l_inf_ci95],
                     "amplitude": _num(f.amplitude), "n_points": f.n_points, "n_boot_ok": f.n_boot_ok,
                     "weighted": f.weighted, "widths": list(f.widths)}
        power_all = _fit_json(self.power_all)
        if power_all is not None:
            power_all["includes_unconverged"] = True
        return {"n_points": self.n_points, "n_converged": self.n_converged,
                "n_convergence_unknown": self.n_unknown, "regime": self.regime, "power": _fit_json(self.power),
                "power_all": power_all, "floor": floor, "floor_note": self.floor_note, "verdict": self.verdict()}


def analyse(points: Sequence[Point], *, seed: int = 0, n_boot: int = 2000,
            n_boot_floor: int = 300) -> VariantAnalysis:
    """Fit one variant's points: `power` (converged, se-weighted), `power_all`, `floor`, and the regime."""
    usable = _usable(points)
    conv = [p for p in usable if p.converged is True]
    power = power_all = None
    if len({p.width for p in conv}) >= 2:
        power = _power_fit(conv, _log_weights(conv), n_boot=n_boot, seed=seed)
    if len({p.width for p in usable}) >= 2:
        power_all = _power_fit(usable, None, n_boot=n_boot, seed=seed)
    floor, note = _floor_fit(conv, _log_weights(conv), n_boot=n_boot_floor, seed=seed)
    return VariantAnalysis(points=tuple(points), n_points=len(usable), n_converged=len(conv),
                           n_unknown=sum(p.converged is None for p in usable), regime=_regime(usable),
                           power=power, power_all=power_all, floor=floor, floor_note=note)


# ------------------------------------------------------------------------------------------------ plots
def _width_means(widths: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Geometric mean of the loss per width: the average the log-log fit passes through."""
    ws = np.unique(widths)
    means = np.array([np.exp(np.log(losses[widths == w]).mean()) for w in ws])
    return ws, means


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _canvas(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, safe off the main thread
    return fig


def _draw_variant(ax: Axes, name: str, a: VariantAnalysis, colour: str) -> None:
    """Points (converged solid, others hollow), per-width means, the fits and a slope -1 reference.
    Every artist gets gid "<name>:<role>" so tests and callers can find it."""
    pts = _usable(a.points)
    if not pts:
        return
    conv = np.array([p.converged is True for p in pts])
    widths, losses = _arrays(pts)
    ax.scatter(widths[conv], losses[conv], s=14, color=colour, alpha=0.55, linewidths=0, gid=f"{name}:converged")
    ax.scatter(widths[~conv], losses[~conv], s=16, facecolors="none", edgecolors=colour, alpha=0.8,
               linewidths=0.9, gid=f"{name}:unconverged")
    ws, means = _width_means(widths, losses)
    all_conv = np.array([conv[widths == w].all() for w in ws])
    label = f"{name} ({a.n_converged}/{a.n_points} converged, {a.regime})"
    ax.plot(ws, means, "o", color=colour, mec="k", mew=0.6, ms=6, label=label, gid=f"{name}:means", zorder=3)
    ax.plot(ws[~all_conv], means[~all_conv], "o", color="white", mec=colour, mew=1.2, ms=5, zorder=4)
    if a.power is not None:
        f = a.power
        grid = np.geomspace(f.widths[0], f.widths[-1], 100)
        ax.plot(grid, f.prefactor * grid ** f.exponent, "-", color=colour, lw=1.8, gid=f"{name}:power",
                label=f"  n^{f.exponent:+.2f} [{f.exponent_ci95[0]:+.2f}, {f.exponent_ci95[1]:+.2f}] "
                      f"(converged{', se-weighted' if f.weighted else ''})")
    elif a.power_all is not None:  # no law to draw: show the finite-time slope, labelled as such
        f = a.power_all
        grid = np.geomspace(f.widths[0], f.widths[-1], 100)
        ax.plot(grid, f.prefactor * grid ** f.exponent, ":", color=colour, lw=1.4, gid=f"{name}:power_all",
                label=f"  all-points slope {f.exponent:+.2f} (unconverged: not the law)")
    if a.floor is not None:
        fl = a.floor
        grid = np.geomspace(fl.widths[0], fl.widths[-1], 100)
        ax.plot(grid, fl.amplitude * grid ** -fl.alpha + fl.l_inf, "-.", color=colour, lw=1.5, gid=f"{name}:floor",
                label=f"  floor: α {fl.alpha:.2f} [{fl.alpha_ci95[0]:.2f}, {fl.alpha_ci95[1]:.2f}], "
                      f"L∞ {fl.l_inf:.2g} [{fl.l_inf_ci95[0]:.2g}, {fl.l_inf_ci95[1]:.2g}]")
    grid = np.geomspace(ws[0], ws[-1], 100)
    ax.plot(grid, means[0] * (grid / ws[0]) ** -1.0, "--", color=colour, lw=1.0, alpha=0.5, gid=f"{name}:reference")


def scaling_figure(analyses: Mapping[str, VariantAnalysis], title: str) -> Figure:
    """The log-log loss-vs-width figure, one colour per variant (see `plot_scaling`)."""
    fig = _canvas((9.5, 5.5))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("width n (particles)")
    ax.set_ylabel("test loss")
    ax.grid(True, which="both", alpha=0.25)
    for i, (name, a) in enumerate(analyses.items()):
        _draw_variant(ax, name, a, f"C{i % 10}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # neutral keys for the marker and line styles shared by all variants
        handles += [Line2D([], [], ls="", marker="o", color="0.4", alpha=0.6),
                    Line2D([], [], ls="", marker="o", mfc="none", mec="0.4"),
                    Line2D([], [], ls="--", color="0.4", lw=1.0)]
        labels += ["converged point", "unconverged point", "reference slope -1"]
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def plot_scaling(analyses: Mapping[str, VariantAnalysis], path: Path, title: str) -> Path:
    """Log-log loss vs width written as PNG to ``path``.

    Per variant, one colour: converged points solid, unconverged hollow; per-width geometric means (white
    centre where a width has unconverged points); the converged-only power fit (solid, exponent and 95%
    interval in the legend) or, without one, the all-points slope (dotted, labelled as not the law); the
    floor model where visible (dash-dot, alpha and L_inf); a slope -1 reference from the smallest width (dashed).
    """
    return _save(scaling_figure(analyses, title), path)


_CURVE_NAME = re.compile(r"(?:(?P<group>.+) )?n=(?P<width>\d+)")
_SHADES = ["Blues", "Oranges", "Greens", "Reds", "Purples", "Greys", "YlOrBr", "PuRd"]  # hues of C0, C1, ...


def _curve_groups(names: Sequence[str]) -> dict[str, list[tuple[str, int | None]]]:
    """Curve names "variant n=width" grouped by variant, each group ordered by width (unparsed names last)."""
    groups: dict[str, list[tuple[str, int | None]]] = {}
    for name in names:
        m = _CURVE_NAME.fullmatch(name)
        group, width = (m["group"] or "", int(m["width"])) if m else ("", None)
        groups.setdefault(group, []).append((name, width))
    return {g: sorted(members, key=lambda nw: (nw[1] is None, nw[1] or 0)) for g, members in groups.items()}


def curves_figure(curves: Mapping[str, Sequence[tuple[int, float]]], title: str,
                  ylabel: str = "test loss") -> Figure:
    """One panel per variant (shared axes), the variant's own hue, darker for wider networks (see `plot_curves`)."""
    groups = _curve_groups(list(curves))
    ncols = min(len(groups), 2 if len(groups) == 4 else 3)
    nrows = math.ceil(len(groups) / ncols)
    fig = _canvas((4.6 * ncols + 0.6, 3.6 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    fig.suptitle(title)
    for k, (ax, (group, members)) in enumerate(zip(axes, groups.items(), strict=False)):
        cmap = matplotlib.colormaps[_SHADES[k % len(_SHADES)]]
        for rank, (name, width) in enumerate(members):
            pts = sorted((s, v) for s, v in curves[name] if math.isfinite(v) and v > 0)
            if not pts:
                continue
            colour = cmap(0.35 + 0.6 * rank / max(1, len(members) - 1))  # light (narrow) to dark (wide)
            ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1.3, color=colour, gid=name,
                    label=f"n={width}" if width is not None else name)
        ax.set_yscale("log")
        ax.set_title(group, fontsize=10)
        ax.grid(True, which="both", alpha=0.2)
        handles, labels = ax.get_legend_handles_labels()
        if len(handles) > 10:  # a long legend would cover the curves: name the narrowest and widest only
            handles, labels = [handles[0], handles[-1]], [labels[0], labels[-1]]
        if handles:
            ax.legend(handles, labels, fontsize=7, title="width", title_fontsize=7, loc="best")
    for ax in axes[len(groups):]:
        ax.set_visible(False)
    for k, ax in enumerate(axes[:len(groups)]):
        if k + ncols >= len(groups):  # nothing visible below: this panel carries the step axis
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("step")
        if k % ncols == 0:
            ax.set_ylabel(ylabel)
    return fig


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str,
                ylabel: str = "test loss") -> Path:
    """Loss vs step as PNG: one panel per variant for curves named "<variant> n=<width>" (names without a
    width go to an untitled panel), each variant in its own hue, shaded light to dark by width; log y, and
    non-positive or non-finite values are left out."""
    return _save(curves_figure(curves, title, ylabel), path)
