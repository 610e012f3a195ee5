"""Scaling fit against synthetic power laws with known exponents; plots are real PNG files."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from orchestrator.analysis import Fit, Point, fit_scaling, plot_curves, plot_scaling

WIDTHS = [16, 32, 64, 128, 256, 512, 1024, 2048]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic(exponent: float, prefactor: float = 3.0, *, seeds: int = 5, sigma: float = 0.1,
              rng_seed: int = 0, widths: list[int] = WIDTHS) -> list[Point]:
    """loss = prefactor * w**exponent * lognormal(0, sigma), one point per (width, seed)."""
    rng = np.random.default_rng(rng_seed)
    return [Point(w, s, float(prefactor * w ** exponent * math.exp(sigma * rng.standard_normal())),
                  "finished") for s in range(seeds) for w in widths]


@pytest.mark.parametrize("exponent", [-1.0, -2.0])
def test_recovers_known_exponent_and_ci_covers_it(exponent: float) -> None:
    fit = fit_scaling(synthetic(exponent))
    lo, hi = fit.exponent_ci95
    assert fit.exponent == pytest.approx(exponent, abs=0.05)
    assert lo < exponent < hi
    assert lo < fit.exponent < hi
    assert hi - lo < 0.2  # 40 points with 10% noise over 7 octaves pin the slope down
    assert fit.prefactor == pytest.approx(3.0, rel=0.3)
    assert 0.95 < fit.r2 < 1.0
    assert (fit.n_points, fit.n_seeds) == (40, 5)


def test_ci_coverage_over_many_datasets() -> None:
    """The percentile interval over seeds should cover the truth most of the time (nominal 95%)."""
    hits = 0
    trials = 40
    for k in range(trials):
        fit = fit_scaling(synthetic(-1.0, seeds=5, sigma=0.3, rng_seed=100 + k), n_boot=500, seed=k)
        lo, hi = fit.exponent_ci95
        hits += lo <= -1.0 <= hi
    # With 5 seeds the percentile bootstrap under-covers somewhat; far below 80% would be a bug.
    assert hits >= 0.8 * trials


def test_noiseless_fit_is_exact() -> None:
    pts = synthetic(-1.0, prefactor=3.0, sigma=0.0)
    fit = fit_scaling(pts)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.exponent == pytest.approx(-1.0, abs=1e-12)
    assert fit.prefactor == pytest.approx(3.0, rel=1e-12)
    assert fit.exponent_ci95[0] == pytest.approx(-1.0, abs=1e-9)
    assert fit.exponent_ci95[1] == pytest.approx(-1.0, abs=1e-9)


def test_only_finished_finite_positive_points_count() -> None:
    good = synthetic(-1.0, sigma=0.0, seeds=2)
    junk = [Point(16, 0, 1e6, "failed"), Point(32, 0, None, "finished"),
            Point(64, 1, math.nan, "finished"), Point(128, 1, math.inf, "finished"),
            Point(256, 0, 0.0, "finished"), Point(512, 1, -1.0, "finished"), Point(4096, 7, 1e-9, "diverged")]
    fit = fit_scaling(good + junk)
    assert fit.n_points == len(good)
    assert fit.n_seeds == 2
    assert fit.exponent == pytest.approx(-1.0, abs=1e-12)


def test_single_seed_bootstraps_over_points() -> None:
    pts = synthetic(-1.0, seeds=1, sigma=0.1)
    fit = fit_scaling(pts)
    lo, hi = fit.exponent_ci95
    assert fit.n_seeds == 1
    assert math.isfinite(lo) and math.isfinite(hi)
    assert lo < hi  # points resampled, so the interval is not degenerate
    assert lo < fit.exponent < hi


def test_bootstrap_is_reproducible_and_seeded() -> None:
    pts = synthetic(-1.0, sigma=0.3)
    assert fit_scaling(pts, seed=1) == fit_scaling(pts, seed=1)
    assert fit_scaling(pts, seed=1).exponent_ci95 != fit_scaling(pts, seed=2).exponent_ci95


@pytest.mark.parametrize("points", [
    [],
    [Point(64, s, 1.0 / 64, "finished") for s in range(5)],
    [Point(64, 0, 0.1, "finished"), Point(128, 0, 0.05, "failed")],
])
def test_too_few_widths_raises(points: list[Point]) -> None:
    with pytest.raises(ValueError, match="2 distinct widths"):
        fit_scaling(points)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_scaling_writes_png(tmp_path: Path) -> None:
    a = synthetic(-1.0)
    b = synthetic(-2.0, prefactor=50.0, rng_seed=1)
    variants: dict[str, tuple[list[Point], Fit | None]] = {
        "relu": (a, fit_scaling(a)), "rbf": (b, fit_scaling(b)),
        "no-fit": ([Point(16, 0, 0.5, "finished")], None), "empty": ([], None)}
    out = plot_scaling(variants, tmp_path / "sub" / "scaling.png", "loss vs width")
    assert out == tmp_path / "sub" / "scaling.png"
    w, h = png_size(out)
    assert w > 300 and h > 200
    assert out.stat().st_size > 20_000  # several lines, markers and a legend, not a blank canvas


def test_plot_curves_writes_png(tmp_path: Path) -> None:
    steps = range(0, 1000, 10)
    curves = {f"n={n}": [(s, 1.0 / n + math.exp(-s / 200)) for s in steps] for n in (16, 64, 256)}
    curves["with junk"] = [(0, math.nan), (10, 0.0), (20, 0.5), (30, 0.4)]
    out = plot_curves(curves, tmp_path / "curves.png", "test loss")
    w, h = png_size(out)
    assert w > 300 and h > 200
    assert out.stat().st_size > 15_000
