"""Error-vs-width scaling: log-log least squares fit with a bootstrap interval, and the plots.

The exponent is measured, never assumed (docs/science.md, section 3): mean-field theory predicts loss ~ n^-1, but
other setups show n^-2, so every fit carries a 95% bootstrap interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Fit", "Point", "fit_scaling", "plot_curves", "plot_scaling"]

FINISHED = "finished"


@dataclass(frozen=True)
class Point:
    """Final result of one network."""

    width: int
    """Number of particles (hidden units) n."""
    seed: int
    """Replicate index; the bootstrap resamples whole seeds."""
    test_loss: float | None
    """Final test loss; None when the network produced none."""
    status: str
    """Network status; only "finished" points enter the fit."""


@dataclass(frozen=True)
class Fit:
    """loss ~ prefactor * width**exponent, fitted by least squares in log-log space."""

    exponent: float
    """Slope of log(loss) on log(width)."""
    exponent_ci95: tuple[float, float]
    """95% percentile bootstrap interval of the exponent (over seeds; over points with a single seed)."""
    prefactor: float
    """exp(intercept): the fitted loss at width 1."""
    r2: float
    """Coefficient of determination of the log-log fit."""
    n_points: int
    """Points used (finished, finite positive loss)."""
    n_seeds: int
    """Distinct seeds among the points used."""


def _usable(points: Sequence[Point]) -> list[Point]:
    return [p for p in points if p.status == FINISHED and p.test_loss is not None
            and math.isfinite(p.test_loss) and p.test_loss > 0 and p.width > 0]


def _arrays(pts: Sequence[Point]) -> tuple[np.ndarray, np.ndarray]:
    """(widths, losses) as float arrays, (P,) each; ``pts`` must come from _usable."""
    widths = np.array([p.width for p in pts], dtype=np.float64)
    losses = np.array([p.test_loss for p in pts], dtype=np.float64)
    return widths, losses


def fit_scaling(points: Sequence[Point], *, n_boot: int = 2000, seed: int = 0) -> Fit:
    """Fit loss ~ prefactor * width**exponent over finished points with finite positive loss.

    Raises ValueError with fewer than 2 distinct widths. The interval resamples seeds with replacement
    (each drawn seed brings all its widths), so correlated points of one seed count once.
    """
    pts = _usable(points)
    widths = sorted({p.width for p in pts})
    if len(widths) < 2:
        raise ValueError(f"fit_scaling needs finished points with finite positive test loss at >= 2 distinct "
                         f"widths; got {len(pts)} usable of {len(points)} points at widths {widths}")
    widths_arr, losses = _arrays(pts)
    x, y = np.log(widths_arr), np.log(losses)
    xm, ym = x.mean(), y.mean()
    dx, dy = x - xm, y - ym
    slope = float((dx @ dy) / (dx @ dx))
    intercept = float(ym - slope * xm)
    ss_res = float(((dy - slope * dx) ** 2).sum())
    ss_tot = float((dy ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0

    seeds = sorted({p.seed for p in pts})
    # Bootstrap units: seeds, or single points when there is only one seed. Per unit we keep the sums
    # that determine an OLS slope, so each replicate is one (n_boot, units) @ (units, 5) product.
    if len(seeds) >= 2:
        unit_of = np.array([seeds.index(p.seed) for p in pts])
        n_units = len(seeds)
    else:
        unit_of = np.arange(len(pts))
        n_units = len(pts)
    cols = np.stack([np.ones_like(dx), dx, dy, dx * dx, dx * dy], axis=1)  # (P, 5), centred for accuracy
    sums = np.zeros((n_units, 5))
    np.add.at(sums, unit_of, cols)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=n_boot)  # (B, units)
    n, sx, sy, sxx, sxy = (counts @ sums).T  # each (B,)
    den = n * sxx - sx * sx
    ok = den > 1e-12 * np.maximum(n * sxx, 1e-300)  # a replicate with a single width has no slope
    slopes = (n[ok] * sxy[ok] - sx[ok] * sy[ok]) / den[ok]
    if slopes.size:
        lo, hi = np.percentile(slopes, [2.5, 97.5])
        ci = (float(lo), float(hi))
    else:
        ci = (math.nan, math.nan)
    return Fit(exponent=slope, exponent_ci95=ci, prefactor=math.exp(intercept), r2=r2,
               n_points=len(pts), n_seeds=len(seeds))


def _width_means(widths: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Geometric mean of the loss per width: the average the log-log fit passes through."""
    ws = np.unique(widths)
    means = np.array([np.exp(np.log(losses[widths == w]).mean()) for w in ws])
    return ws, means


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch, safe off the main thread
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.25)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_scaling(variants: Mapping[str, tuple[Sequence[Point], Fit | None]], path: Path, title: str) -> Path:
    """Log-log loss vs width, one colour per variant, written as PNG to ``path``.

    Per variant: every seed's point (small, translucent), the per-width geometric means (markers), the
    fitted power law with exponent and 95% interval in the legend, and a dashed slope -1 reference
    anchored at the smallest width's mean.
    """
    fig, ax = _new_axes(title, "width n (particles)", "test loss")
    colours = [f"C{i % 10}" for i in range(len(variants))]
    has_reference = False
    for colour, (name, (points, fit)) in zip(colours, variants.items(), strict=True):
        pts = _usable(points)
        if not pts:
            continue
        widths, losses = _arrays(pts)
        ax.scatter(widths, losses, s=12, alpha=0.3, color=colour, linewidths=0)
        ws, means = _width_means(widths, losses)
        ax.plot(ws, means, "o", color=colour, markersize=6, label=f"{name}: mean over seeds")
        grid = np.geomspace(ws[0], ws[-1], 100)
        if fit is not None:
            lo, hi = fit.exponent_ci95
            ax.plot(grid, fit.prefactor * grid ** fit.exponent, "-", color=colour, lw=1.5,
                    label=f"{name}: fit n^{fit.exponent:.3f} [{lo:.3f}, {hi:.3f}] (R²={fit.r2:.3f})")
        ax.plot(grid, means[0] * (grid / ws[0]) ** -1.0, "--", color=colour, lw=1.0, alpha=0.6)
        has_reference = True
    if has_reference:  # one neutral legend entry for all the per-variant reference lines
        ax.plot([], [], "--", color="0.4", lw=1.0, label="reference slope -1 (from smallest width)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path, title: str,
                ylabel: str = "test loss") -> Path:
    """Loss vs step, one line per curve, log y (non-positive or non-finite values are left out).

    Curves named "<group> <rest>" (the sweep's "variant n=width") share a line style per group and get
    colours from one continuous map, so more than ten curves never repeat a colour+style pair."""
    import matplotlib

    fig, ax = _new_axes(title, "step", ylabel)
    groups = list(dict.fromkeys(name.split(" ", 1)[0] for name in curves))
    styles = ["-", "--", ":", "-."]
    cmap = matplotlib.colormaps["viridis"]
    members: dict[str, list[str]] = {g: [n for n in curves if n.split(" ", 1)[0] == g] for g in groups}
    for name, curve in curves.items():
        pts = sorted((s, v) for s, v in curve if math.isfinite(v) and v > 0)
        if not pts:
            continue
        g = name.split(" ", 1)[0]
        rank = members[g].index(name)
        colour = cmap(rank / max(1, len(members[g]) - 1) * 0.9)
        ax.plot([s for s, _ in pts], [v for _, v in pts], lw=1.2, label=name,
                color=colour, linestyle=styles[groups.index(g) % len(styles)])
    ax.set_yscale("log")
    handles = ax.get_legend_handles_labels()[0]
    if 0 < len(handles) <= 20:
        ax.legend(fontsize=8)
    return _save(fig, path)
