"""Scaling analysis against planted data: power law, floor model, weights, regime rule, plots, JSON."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from orchestrator.analysis import (
    REL_SE_FLOOR,
    Fit,
    Point,
    VariantAnalysis,
    analyse,
    curves_figure,
    fit_scaling,
    plot_curves,
    plot_scaling,
    scaling_figure,
)

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



# ------------------------------------------------------------------------------------------- analyse
def planted(law: Callable[[float], float], *, seeds: int = 6, sigma: float = 0.05, rng_seed: int = 0,
            widths: list[int] = WIDTHS, converged: Callable[[int, int], bool | None] = lambda w, s: True,
            rel_se: float = 0.05) -> list[Point]:
    """loss = law(w) * lognormal(0, sigma) with se = rel_se * loss, one point per (width, seed)."""
    rng = np.random.default_rng(rng_seed)
    out = []
    for s in range(seeds):
        for w in widths:
            loss = float(law(w) * math.exp(sigma * rng.standard_normal()))
            out.append(Point(w, s, loss, "finished", se=rel_se * loss, converged=converged(w, s)))
    return out


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_floor_model_recovers_planted_alpha_and_floor(rng_seed: int) -> None:
    amplitude, l_inf = 2.0, 0.004  # the floor is 4x the power term at the largest width
    a = analyse(planted(lambda w: amplitude / w + l_inf, rng_seed=rng_seed), seed=rng_seed)
    assert a.floor is not None, a.floor_note
    assert a.floor_note == "visible"
    # The estimates recover the planted values (a 95% interval misses now and then by design, so the check is
    # on the estimate, with the interval around it and of a sensible width).
    lo, hi = a.floor.alpha_ci95
    assert a.floor.alpha == pytest.approx(1.0, abs=0.05) and lo < a.floor.alpha < hi and hi - lo < 0.2
    lo, hi = a.floor.l_inf_ci95
    assert a.floor.l_inf == pytest.approx(l_inf, rel=0.1) and lo < a.floor.l_inf < hi and lo > 0
    assert a.floor.amplitude == pytest.approx(amplitude, rel=0.3)
    assert a.floor.weighted and a.floor.widths == tuple(WIDTHS)
    # the pure power fit is bent by the floor: its slope is far shallower than -1
    assert a.power is not None and a.power.exponent > -0.85
    assert "floor visible" in a.verdict()


@pytest.mark.parametrize("rng_seed", [0, 1, 2])
def test_pure_power_law_recovered_and_no_floor_invented(rng_seed: int) -> None:
    a = analyse(planted(lambda w: 3.0 / w, sigma=0.1, rng_seed=rng_seed), seed=rng_seed)
    assert a.power is not None
    lo, hi = a.power.exponent_ci95
    assert lo < -1.0 < hi
    assert a.power.exponent == pytest.approx(-1.0, abs=0.05)
    assert a.power.weighted
    assert a.floor is None and a.floor_note.startswith("not visible")
    assert (a.n_points, a.n_converged, a.regime) == (48, 48, "width-limited")
    assert a.verdict().startswith("width-limited, the long-time law: exponent -1.0") or \
        a.verdict().startswith("width-limited, the long-time law: exponent -0.99")


def test_floor_needs_four_converged_widths() -> None:
    a = analyse(planted(lambda w: 2.0 / w + 0.004, widths=[16, 64, 256]))
    assert a.floor is None
    assert a.floor_note.startswith("not fitted") and ">= 4" in a.floor_note


def test_unconverged_points_do_not_enter_power() -> None:
    converged = planted(lambda w: 3.0 / w, widths=[16, 32, 64, 128, 256])
    # planted transients: much higher losses, and a width the converged points never reach
    stuck = planted(lambda w: 0.5 * w ** -0.1, widths=[128, 256, 512, 1024, 2048], rng_seed=9,
                    converged=lambda w, s: False)
    unknown = planted(lambda w: 0.3, widths=[64, 2048], converged=lambda w, s: None)
    a = analyse(converged + stuck + unknown)
    alone = analyse(converged)
    assert a.power == alone.power
    assert a.power is not None and a.power.widths == (16, 32, 64, 128, 256)
    assert a.floor == alone.floor and a.floor_note == alone.floor_note
    assert (a.n_points, a.n_converged, a.n_unknown) == (len(converged) + len(stuck) + len(unknown),
                                                        len(converged), len(unknown))
    # power_all is the old fit over everything (unweighted): the transients drag it far from -1
    assert a.power_all == fit_scaling(converged + stuck + unknown)
    assert a.power_all is not None and a.power_all.exponent > -0.6


def test_weighting_discounts_a_point_with_a_huge_standard_error() -> None:
    pts = planted(lambda w: 3.0 / w, sigma=0.01, rel_se=0.01)
    bad = next(i for i, p in enumerate(pts) if (p.width, p.seed) == (2048, 0))
    assert pts[bad].test_loss is not None
    pts[bad] = Point(2048, 0, 20 * pts[bad].test_loss, "finished", se=100 * pts[bad].test_loss, converged=True)
    weighted = fit_scaling(pts, weighted=True)
    plain = fit_scaling(pts)
    assert weighted.weighted and not plain.weighted
    assert weighted.exponent == pytest.approx(-1.0, abs=0.005)
    assert plain.exponent > -0.95  # one point 20x off at the end of the range tilts the unweighted line
    assert analyse(pts).power == weighted


def test_weighted_fit_matches_numpy_polyfit() -> None:
    """Oracle: numpy's weighted polyfit with w = 1/sigma, sigma = the relative se floored at REL_SE_FLOOR."""
    rng = np.random.default_rng(3)
    pts = [Point(p.width, p.seed, p.test_loss, p.status, se=float(rel) * (p.test_loss or 0.0))
           for p, rel in zip(planted(lambda w: 3.0 / w ** 1.3, sigma=0.2), rng.uniform(0.0, 0.3, 48), strict=True)]
    x = np.log([p.width for p in pts])
    y = np.log([p.test_loss for p in pts])
    sigma = np.maximum([(p.se or 0.0) / (p.test_loss or 1.0) for p in pts], REL_SE_FLOOR)
    slope, intercept = np.polyfit(x, y, 1, w=1.0 / sigma)
    fit = fit_scaling(pts, weighted=True)
    assert fit.exponent == pytest.approx(slope, rel=1e-10)
    assert fit.prefactor == pytest.approx(math.exp(intercept), rel=1e-10)
    assert fit.exponent != pytest.approx(fit_scaling(pts).exponent, rel=1e-3)  # the weights did something


def test_missing_or_zero_se_rules() -> None:
    pts = planted(lambda w: 3.0 / w, sigma=0.2)
    one_missing = [*pts[:-1], Point(pts[-1].width, pts[-1].seed, pts[-1].test_loss, "finished", converged=True)]
    fit = analyse(one_missing).power
    assert fit is not None and not fit.weighted  # one se unknown: the whole fit is unweighted
    assert fit == fit_scaling(one_missing)
    # se = 0 everywhere: every point hits the same floor, so the weights are equal, not infinite
    zeros = [Point(p.width, p.seed, p.test_loss, "finished", se=0.0, converged=True) for p in pts]
    zfit = fit_scaling(zeros, weighted=True)
    assert zfit.weighted
    assert zfit.exponent == pytest.approx(fit_scaling(zeros).exponent, rel=1e-12)


def regime_case(converged_at: dict[int, int], widths: tuple[int, ...] = (16, 32, 64, 128),
                seeds: int = 4) -> VariantAnalysis:
    """``widths`` x ``seeds`` points on 1/w, with converged_at[w] of the seeds at width w converged (default all)."""
    pts = [Point(w, s, 1.0 / w, "finished", se=0.01 / w, converged=s < converged_at.get(w, seeds))
           for w in widths for s in range(seeds)]
    return analyse(pts, n_boot=50, n_boot_floor=20)


@pytest.mark.parametrize(("converged_at", "regime"), [
    ({}, "width-limited"),                                  # 16/16
    ({16: 3, 32: 3}, "mixed"),                              # 14/16 = 0.875 < 0.9
    ({16: 0, 32: 0, 64: 0, 128: 0}, "time-limited"),        # 0/16
    ({64: 0, 128: 0}, "mixed"),                             # 8/16: exactly half is not "under half"
    ({32: 3, 64: 0, 128: 0}, "time-limited"),               # 7/16 < half
    ({128: 1}, "mixed"),                                    # 13/16
])
def test_regime_rule_by_converged_share(converged_at: dict[int, int], regime: str) -> None:
    assert regime_case(converged_at).regime == regime


def test_regime_rule_at_its_boundaries() -> None:
    # 36/40 = 0.9 exactly, the unconverged points at small widths: width-limited
    assert regime_case({16: 8, 32: 8}, seeds=10).regime == "width-limited"
    # 8 widths x 4 seeds: 29/32 >= 0.9, but 3 of the 4 largest networks unconverged: the top is time-limited
    assert regime_case({2048: 1}, widths=tuple(WIDTHS)).regime == "mixed"
    assert regime_case({2048: 2}, widths=tuple(WIDTHS)).regime == "width-limited"  # half at the top is enough
    # converged at one width only: half the points, but no exponent can be measured
    only_top = analyse([Point(w, s, 1.0 / w, "finished", converged=w == 128) for w in (64, 128) for s in range(4)])
    assert only_top.regime == "time-limited" and only_top.power is None
    assert only_top.verdict().startswith("time-limited: only 4/8 points converged;")


def test_verdicts_name_the_regime() -> None:
    stuck = analyse(planted(lambda w: 0.5 * w ** -0.1, converged=lambda w, s: w <= 32 and s < 1))
    assert stuck.regime == "time-limited"
    assert stuck.verdict().startswith("time-limited: only 2/48 points converged")
    assert "is not the law" in stuck.verdict()
    old = analyse(planted(lambda w: 3.0 / w, converged=lambda w, s: None))
    assert old.regime == "time-limited" and old.power is None and old.power_all is not None
    assert "not recorded" in old.verdict()
    mixed = analyse(planted(lambda w: 3.0 / w, converged=lambda w, s: w <= 512))
    assert mixed.regime == "mixed" and mixed.verdict().startswith("mixed: exponent -1.0")
    assert analyse([]).regime is None and "nothing to fit" in analyse([]).verdict()
    for a in (stuck, old, mixed):
        assert "\n" not in a.verdict()


def test_to_json_is_plain_json_and_round_trips() -> None:
    a = analyse(planted(lambda w: 2.0 / w + 0.004))
    data = a.to_json()
    text = json.dumps(data, allow_nan=False)
    assert json.loads(text) == data
    assert data["n_points"] == 48 and data["n_converged"] == 48 and data["regime"] == "width-limited"
    assert data["power"]["exponent"] == a.power.exponent if a.power else False
    assert data["power_all"]["includes_unconverged"] is True
    assert data["floor"]["l_inf_ci95"] == list(a.floor.l_inf_ci95) if a.floor else False
    assert data["verdict"] == a.verdict()
    # non-finite numbers (an interval without valid replicates) become null, never NaN
    nan_fit = Fit(-1.0, (math.nan, math.inf), 3.0, 1.0, 2, 1, widths=(16, 32))
    b = VariantAnalysis(points=(), n_points=2, n_converged=2, n_unknown=0, regime="width-limited", power=nan_fit,
                        power_all=None, floor=None, floor_note="not fitted")
    nan_data = b.to_json()
    assert nan_data["power"]["exponent_ci95"] == [None, None]
    assert json.loads(json.dumps(nan_data, allow_nan=False)) == nan_data


# ------------------------------------------------------------------------------------------- plots
def artists(fig: Figure) -> dict[str, object]:
    ax = fig.axes[0]
    return {a.get_gid(): a for a in [*ax.lines, *ax.collections] if a.get_gid()}


def test_scaling_figure_draws_every_point_and_each_fit() -> None:
    analyses = {
        "floor": analyse(planted(lambda w: 2.0 / w + 0.004)),
        "half": analyse(planted(lambda w: 3.0 / w, converged=lambda w, s: w <= 256)),
        "stuck": analyse(planted(lambda w: 0.5 * w ** -0.1, converged=lambda w, s: False)),
        "empty": analyse([]),
    }
    fig = scaling_figure(analyses, "loss vs width")
    got = artists(fig)
    for name, a in analyses.items():
        pts = [p for p in a.points if p.test_loss]
        conv = {(p.width, p.test_loss) for p in pts if p.converged}
        unconv = {(p.width, p.test_loss) for p in pts if not p.converged}
        if not pts:
            assert not any(k.startswith(name) for k in got)
            continue
        drawn_conv = {tuple(xy) for xy in got[f"{name}:converged"].get_offsets()}  # type: ignore[attr-defined]
        drawn_unconv = {tuple(xy) for xy in got[f"{name}:unconverged"].get_offsets()}  # type: ignore[attr-defined]
        assert drawn_conv == conv and drawn_unconv == unconv
        if unconv:  # hollow: transparent face, edge in the variant's colour
            coll = got[f"{name}:unconverged"]
            assert all(fc[3] == 0 for fc in coll.get_facecolors())  # type: ignore[attr-defined]
            colour = to_rgba(got[f"{name}:means"].get_color())  # type: ignore[attr-defined]
            assert tuple(coll.get_edgecolors()[0][:3]) == pytest.approx(colour[:3])  # type: ignore[attr-defined]
        assert f"{name}:reference" in got
    # the converged-only power law, drawn from its own parameters over its converged widths
    for name in ("floor", "half"):
        line = got[f"{name}:power"]
        assert isinstance(line, Line2D)
        fit = analyses[name].power
        assert fit is not None
        x = np.asarray(line.get_xdata(), dtype=float)
        assert x[0] == fit.widths[0] and x[-1] == fit.widths[-1]
        assert np.allclose(line.get_ydata(), fit.prefactor * x ** fit.exponent)
        assert line.get_linestyle() == "-"
    assert got["half:power"].get_xdata()[-1] == 256  # type: ignore[attr-defined]
    fl = analyses["floor"].floor
    assert fl is not None
    floor_line = got["floor:floor"]
    assert isinstance(floor_line, Line2D) and floor_line.get_linestyle() == "-."
    x = np.asarray(floor_line.get_xdata(), dtype=float)
    assert np.allclose(floor_line.get_ydata(), fl.amplitude * x ** -fl.alpha + fl.l_inf)
    assert "half:floor" not in got and "stuck:power" not in got
    assert got["stuck:power_all"].get_linestyle() == ":"  # type: ignore[attr-defined]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(f"{analyses['half'].power.exponent:+.2f}" in t for t in labels)  # type: ignore[union-attr]
    assert any("L∞" in t for t in labels) and "reference slope -1" in labels


def test_plot_scaling_writes_png(tmp_path: Path) -> None:
    out = plot_scaling({"a": analyse(planted(lambda w: 3.0 / w))}, tmp_path / "sub" / "scaling.png", "t")
    assert out == tmp_path / "sub" / "scaling.png"
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_curves_figure_one_panel_per_variant_shaded_by_width() -> None:
    steps = range(0, 1000, 10)
    widths = [16, 64, 256, 1024, 4096, 16384]
    curves = {f"{v} n={n}": [(s, c / n + math.exp(-s / 200)) for s in steps]
              for v, c in (("sgd", 1.0), ("bd", 2.0), ("closed", 3.0)) for n in widths}
    curves["bd n=32"] = [(0, math.nan), (10, 0.0), (20, 0.5), (30, 0.4)]  # junk values are left out
    fig = curves_figure(curves, "test loss")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["sgd", "bd", "closed"]
    hues = []
    for ax in panels:
        lines = {ln.get_gid(): ln for ln in ax.lines}
        names = [k for k in curves if k.startswith(ax.get_title() + " ")]
        assert set(lines) == set(names)
        order = sorted(names, key=lambda k: int(k.split("=")[1]))
        lum = [float(np.dot(to_rgba(lines[k].get_color())[:3], [0.299, 0.587, 0.114])) for k in order]
        assert all(a > b for a, b in itertools.pairwise(lum))  # darker = wider
        hues.append(to_rgba(lines[order[-1]].get_color()))
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) == len(names)
    assert len({h for h in hues}) == 3  # each variant its own hue
    junk = next(ln for ln in panels[1].lines if ln.get_gid() == "bd n=32")
    assert list(junk.get_xdata()) == [20, 30]


def test_curves_figure_handles_unparsed_names_and_long_legends(tmp_path: Path) -> None:
    many = {f"v n={2 ** k}": [(0, 1.0), (10, 0.5)] for k in range(4, 16)}
    fig = curves_figure(many, "t")
    assert len(fig.axes[0].lines) == 12 and len(fig.axes[0].get_legend().get_texts()) == 2
    plain = {"n=16": [(0, 1.0), (1, 0.5)], "with junk": [(0, math.nan), (10, 0.0), (20, 0.5)]}
    out = plot_curves(plain, tmp_path / "curves.png", "test loss")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert {ln.get_gid() for ln in curves_figure(plain, "t").axes[0].lines} == {"n=16", "with junk"}


def _direct_seed_mean(per_seed: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """Oracle: at every reported step, the mean over the seeds that have reported of each one's latest value."""
    curves = [sorted((s, v) for s, v in c if math.isfinite(v)) for c in per_seed]
    steps = sorted({s for c in curves for s, _ in c})
    out = []
    for step in steps:
        vals = [[v for s, v in c if s <= step][-1] for c in curves if c and c[0][0] <= step]
        out.append((step, sum(vals) / len(vals)))
    return out


def test_seed_mean_curve_carries_a_stopped_seed_at_its_last_value() -> None:
    from orchestrator.curves import MeanCurves

    def seed_mean_curve(per_seed: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
        acc = MeanCurves()
        for i, curve in enumerate(per_seed):
            for step, value in sorted(curve):
                acc.add("", i, step, value)
        return acc.means().get("", [])

    a = [(0, 4.0), (10, 2.0), (20, 1.0)]           # stopped at step 20
    b = [(0, 6.0), (10, 4.0), (20, 3.0), (30, 2.0), (40, 1.0)]
    got = seed_mean_curve([a, b])
    assert got == [(0, 5.0), (10, 3.0), (20, 2.0), (30, 1.5), (40, 1.0)]
    assert seed_mean_curve([[(0, float("nan")), (10, 2.0)], [(0, 1.0)]]) == [(0, 1.0), (10, 1.5)]


def test_mean_curves_accumulated_online_equal_the_direct_mean() -> None:
    """Interleaved reports of many networks in several groups (different grids, stops, NaNs, a network
    continued after its end) give each group the direct mean over its networks' whole curves."""
    import random

    from orchestrator.curves import MeanCurves

    rng = random.Random(3)
    curves: dict[int, list[tuple[int, float]]] = {}
    group_of = {nid: f"v n={2 ** (nid % 3 + 4)}" for nid in range(30)}
    for nid in group_of:
        every = rng.choice([10, 20, 25])
        stop = rng.randrange(1, 40) * every
        curves[nid] = [(s, math.nan if rng.random() < 0.05 else rng.lognormvariate(0, 2))
                       for s in range(rng.choice([0, every]), stop + 1, every)]
    acc = MeanCurves()
    pos = dict.fromkeys(curves, 0)
    while any(pos[n] < len(c) for n, c in curves.items()):
        nid = rng.choice([n for n, c in curves.items() if pos[n] < len(c)])
        step, value = curves[nid][pos[nid]]
        acc.add(group_of[nid], nid, step, value)
        pos[nid] += 1
    got = acc.means(["v n=64", "v n=16"])
    assert list(got)[:2] == ["v n=64", "v n=16"] and set(got) == set(group_of.values())
    for name, mean in got.items():
        want = _direct_seed_mean([c for n, c in curves.items() if group_of[n] == name])
        assert [s for s, _ in mean] == [s for s, _ in want]
        assert all(math.isclose(a, b, rel_tol=1e-9) for (_, a), (_, b) in zip(mean, want, strict=True))
