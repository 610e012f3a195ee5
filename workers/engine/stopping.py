"""Stationarity of a network's test loss: the final-window estimate and the plateau test.

The 1/n law is a long-time law, so each network's result says whether it reached stationarity. At every
report a network's test loss joins its *window*: the reports of the last quarter of the run, at least the
last ``window`` steps, and never more than the last half of the run so far (so a short run's mean is not
dragged up by its early, falling losses).
Over the window:

* the result is the **mean** of the test loss with its **standard error**, the latter corrected for the
  serial correlation of successive reports (SGD's noise floor wanders slowly): n_eff = m (1 - r) / (1 + r)
  with r the lag-1 autocorrelation, clipped to [0, 0.9];
* the **plateau test**: the least-squares slope b of log L against the step t, with its standard error
  (residuals, same correction), projected over a **doubling of the training time**: D = -b H with the
  horizon H = max(W, t ln 2) (W = ``window`` steps). D is the relative decrease the window's trend predicts
  if the network trained as long again; on a power-law tail L ~ t^s it is -s ln 2 whatever t, so the test is
  about the long-time regime, not about one window's worth of steps (a fixed window would call any slow
  tail converged once t >> W: at t = 13000, a curve still falling as t^-0.6 loses only 5% per 1000 steps).
  The network is converged when even the upper confidence bound of that decrease, (-b + z SE(b)) H, is
  below ``rel_tol``: a curve must *show* that it stopped falling, so noise alone rarely stops a network that
  is still decreasing (the test is one-sided at z standard errors). Where the remaining tail decays like
  1/t the converged loss is within about 2 rel_tol of its limit;
* the **final slope** d log L / d log t (least squares against log t), the quantity the theory's long-time
  regime is about, reported for every network.

Everything here is plain Python on a few dozen numbers: it runs per report, on the driver's data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

TINY = 1e-300
#: Fewest reports in a window for the plateau test (and the standard error) to be meaningful.
MIN_POINTS = 10


@dataclass(frozen=True)
class Estimate:
    """A network's result over its final window."""

    mean: float
    """Mean test loss over the window."""
    se: float | None
    """Standard error of ``mean`` (autocorrelation-corrected); None with a single point."""
    slope: float | None
    """d log L / d log t over the window (None with fewer than 2 points or t = 0)."""
    converged: bool
    """The plateau test passed (see the module docstring)."""
    n_points: int
    """Reports in the window."""
    start: int
    """First step of the window."""


def window_start(step: int, window: int) -> int:
    """First step of the window ending at ``step``: the last quarter of the run but at least the last
    ``window`` steps, and at most the last half. It grows with the run because the plateau test projects
    over a doubling of the run: a window of fixed length would give it an error growing with t."""
    return max(step - max(window, step // 4), (step + 1) // 2)


def horizon(step: int, window: int) -> float:
    """Steps over which the plateau test projects the window's trend: a doubling of the run (at least the
    window itself)."""
    return max(float(window), step * math.log(2.0))


def _lag1(values: Sequence[float]) -> float:
    """Lag-1 autocorrelation clipped to [0, 0.9] (0 for fewer than 3 values)."""
    m = len(values)
    if m < 3:
        return 0.0
    mu = sum(values) / m
    dev = [v - mu for v in values]
    den = sum(d * d for d in dev)
    if den <= 0:
        return 0.0
    num = sum(dev[i] * dev[i + 1] for i in range(m - 1))
    return min(0.9, max(0.0, num / den))


def _ols(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """(slope, standard error of the slope, corrected for lag-1 correlation of residuals); None if x is
    constant or there are fewer than 3 points."""
    m = len(x)
    if m < 3:
        return None
    xm, ym = sum(x) / m, sum(y) / m
    sxx = sum((a - xm) ** 2 for a in x)
    if sxx <= 0:
        return None
    b = sum((a - xm) * (c - ym) for a, c in zip(x, y, strict=True)) / sxx
    res = [c - ym - b * (a - xm) for a, c in zip(x, y, strict=True)]
    s2 = sum(r * r for r in res) / (m - 2)
    rho = _lag1(res)
    se = math.sqrt(s2 / sxx * (1 + rho) / (1 - rho))
    return b, se


def estimate(points: Sequence[tuple[float, float]], *, window: int, rel_tol: float, z: float) -> Estimate | None:
    """The window estimate of ``points`` ((step, test loss), ascending steps, already cut to the window of
    ``window`` steps); None when there is no finite point."""
    pts = [(t, v) for t, v in points if math.isfinite(v)]
    if not pts:
        return None
    m = len(pts)
    vals = [v for _, v in pts]
    mean = sum(vals) / m
    se: float | None = None
    if m >= 2:
        var = sum((v - mean) ** 2 for v in vals) / (m - 1)
        rho = _lag1(vals)
        n_eff = max(1.0, m * (1 - rho) / (1 + rho))
        se = math.sqrt(var / n_eff)
    logs = [math.log(max(v, TINY)) for v in vals]
    steps = [float(t) for t, _ in pts]
    slope = None
    pos = [(math.log(t), y) for t, y in zip(steps, logs, strict=True) if t > 0]
    if len(pos) >= 2:
        lx = [a for a, _ in pos]
        ly = [c for _, c in pos]
        xm, ym = sum(lx) / len(lx), sum(ly) / len(ly)
        sxx = sum((a - xm) ** 2 for a in lx)
        if sxx > 0:
            slope = sum((a - xm) * (c - ym) for a, c in zip(lx, ly, strict=True)) / sxx
    converged = False
    # The test needs a window of at least half its length (the run is >= ``window`` steps old) and enough
    # reports: SGD's floor wanders slowly, and a short window cannot tell a wander from a trend.
    fit = _ols(steps, logs) if m >= MIN_POINTS and pts[-1][0] >= window else None
    if fit is not None:
        b, se_b = fit
        converged = (-b + z * se_b) * horizon(int(pts[-1][0]), window) < rel_tol
    return Estimate(mean=mean, se=se, slope=slope, converged=converged, n_points=m, start=int(pts[0][0]))


#: Most points a window keeps: past this, reports are averaged in bins of a doubling number of reports, so a
#: network's window (and its checkpoint) stays bounded however long it runs while its span grows with t.
MAX_POINTS = 64


class Window:
    """The (step, test loss) points of one network inside its current window, in bounded memory.

    A point is one report, or, once the window spans more than :data:`MAX_POINTS` reports, the average (of
    step and loss) over a bin of ``bin`` consecutive reports: every point of the window then covers the same
    number of reports, so the estimate's mean and slope weigh the window evenly. ``pending`` sums the
    reports of the bin being filled (step sum, loss sum, count); they join the window when it is full."""

    def __init__(self, points: Sequence[tuple[float, float]] = (), bin: int = 1,
                 pending: Sequence[float] = (0.0, 0.0, 0)) -> None:
        self.points: list[tuple[float, float]] = [(float(t), float(v)) for t, v in points]
        self.bin = bin
        self.pending = (float(pending[0]), float(pending[1]), int(pending[2]))

    def add(self, step: int, loss: float, window: int, not_before: int = 0) -> None:
        """Add a report and drop the points before the window (and before ``not_before``: the start of the
        network's final dynamics, e.g. the end of birth-death)."""
        st, sv, n = self.pending
        st, sv, n = st + step, sv + loss, n + 1
        if n >= self.bin:
            self.points.append((st / n, sv / n))
            st, sv, n = 0.0, 0.0, 0
        self.pending = (st, sv, n)
        first = max(window_start(step, window), not_before)
        self.points = [(t, v) for t, v in self.points if t >= first]
        if len(self.points) > MAX_POINTS:  # merge neighbours: half the points, twice the reports each
            pts = self.points[len(self.points) % 2:]
            self.points = [((a[0] + b[0]) / 2, (a[1] + b[1]) / 2) for a, b in zip(pts[::2], pts[1::2], strict=True)]
            self.bin *= 2

    def estimate(self, *, window: int, rel_tol: float, z: float) -> Estimate | None:
        return estimate(self.points, window=window, rel_tol=rel_tol, z=z)

    def state(self) -> dict[str, object]:
        """What a checkpoint keeps (plain JSON)."""
        return {"points": self.points, "bin": self.bin, "pending": list(self.pending)}

    @classmethod
    def from_state(cls, state: object) -> Window:
        """The window a checkpoint kept (a plain list of points: an older checkpoint)."""
        if isinstance(state, dict):
            return cls(state["points"], int(state["bin"]), state["pending"])
        return cls(state)  # type: ignore[arg-type]


__all__ = ["MAX_POINTS", "MIN_POINTS", "Estimate", "Window", "estimate", "horizon", "window_start"]
