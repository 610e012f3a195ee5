"""Seed-averaged loss curves, accumulated as reports arrive, in memory bounded by the steps and the groups,
not by the networks: the driver keeps no network's curve history (curves.png is drawn from this).

The mean at a step is over the group's networks that have reported by then, each at its latest value: a
network stops when its loss is stationary (or at the cap), so its last value stands for what follows, and the
mean does not jump where the set of networks still running changes. Each network's curve is a step function
of its reports, so the group's sum is kept as a difference array (at each reported step: how much the sum and
the count change there); a network costs one float (its latest value, 8 bytes), whatever its curve's length.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable

__all__ = ["MeanCurves", "curve_name"]


def curve_name(variant: str, width: int) -> str:
    """A group's name, as curves.png's panels and legends read it (see analysis.curves_figure)."""
    return f"{variant} n={width}"


class _Group:
    __slots__ = ("count_delta", "sum_delta")

    def __init__(self) -> None:
        self.sum_delta: dict[int, float] = {}
        self.count_delta: dict[int, int] = {}

    def add(self, step: int, value: float, previous: float | None) -> None:
        self.sum_delta[step] = self.sum_delta.get(step, 0.0) + value - (previous or 0.0)
        if previous is None:
            self.count_delta[step] = self.count_delta.get(step, 0) + 1

    def mean(self) -> list[tuple[int, float]]:
        out: list[tuple[int, float]] = []
        total, count = 0.0, 0
        for step in sorted(self.sum_delta):
            total += self.sum_delta[step]
            count += self.count_delta.get(step, 0)
            out.append((step, total / count))
        return out


class MeanCurves:
    """Per named group (e.g. "sgd n=128"), the mean curve of its networks. Each network's points must come in
    increasing step order (the ledger's invariant); non-finite values are skipped."""

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        # Per network id (ids are dense: 0..n-1), its latest finite value; NaN: none yet. A network continued
        # after its end (a sweep extended to more steps) goes on from there.
        self._latest = array("d")

    def add(self, group: str, net_id: int, step: int, value: float) -> None:
        if not math.isfinite(value):
            return
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group()
        if net_id >= len(self._latest):
            self._latest.extend([math.nan] * (net_id + 1 - len(self._latest)))
        previous = self._latest[net_id]
        g.add(step, value, None if math.isnan(previous) else previous)
        self._latest[net_id] = value

    def means(self, order: Iterable[str] | None = None) -> dict[str, list[tuple[int, float]]]:
        """Each group's mean curve; groups in ``order`` first (those with points), then the rest."""
        names = [n for n in (order or ()) if n in self._groups]
        names += [n for n in self._groups if n not in names]
        return {n: self._groups[n].mean() for n in names}

