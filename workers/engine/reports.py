"""What a pack reports: per-network metrics, retirements with their final-window estimates, and the report
that carries them from the engine to the driver (and to the report log, as JSON).

Torch-free on purpose: the driver receives and records reports without importing torch (its start-up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .specs import NetStatus
from .stopping import Estimate


@dataclass(frozen=True)
class NetMetrics:
    """Losses of one network at one step. ``train_loss`` is the mean loss of the steps since the last report
    (None at step 0); under exact energies both losses are the population loss."""

    net_id: int
    step: int
    train_loss: float | None
    test_loss: float


@dataclass(frozen=True)
class Retired:
    """A network that left its pack, and why."""

    net_id: int
    step: int
    status: NetStatus
    reason: str
    final_test_loss: float | None
    """The last test loss."""
    estimate: Estimate | None = None
    """The final-window estimate (mean, standard error, slope, converged); None for diverged, pruned and
    failed networks."""

    @property
    def result_loss(self) -> float | None:
        """The network's result: the final-window mean where there is one, else the last test loss."""
        return self.estimate.mean if self.estimate is not None else self.final_test_loss


@dataclass(frozen=True)
class Report:
    """What a pack emits at each reporting step."""

    step: int
    metrics: tuple[NetMetrics, ...]
    retired: tuple[Retired, ...]
    done: bool
    bd_events: dict[int, tuple[int, int]] = field(default_factory=dict)
    """net_id -> (kills, clones) accumulated since the last report."""

    def values(self, m: NetMetrics) -> dict[str, float]:
        """The metrics to record for one of this report's networks (test, train, birth-death counts)."""
        vals = {"test_loss": m.test_loss}
        if m.train_loss is not None:
            vals["train_loss"] = m.train_loss
        kc = self.bd_events.get(m.net_id)
        if kc is not None:
            vals["bd_kills"], vals["bd_clones"] = float(kc[0]), float(kc[1])
        return vals


def report_to_json(rep: Report) -> dict[str, Any]:
    return {
        "step": rep.step, "done": rep.done,
        "metrics": [[m.net_id, m.step, m.train_loss, m.test_loss] for m in rep.metrics],
        "retired": [[r.net_id, r.step, r.status.value, r.reason, r.final_test_loss, estimate_json(r.estimate)]
                    for r in rep.retired],
        "bd": [[k, v[0], v[1]] for k, v in rep.bd_events.items()],
    }


def report_from_json(d: dict[str, Any]) -> Report:
    return Report(
        step=d["step"], done=d["done"],
        metrics=tuple(NetMetrics(*m) for m in d["metrics"]),
        retired=tuple(Retired(r[0], r[1], NetStatus(r[2]), r[3], r[4], estimate_from_json(r[5] if len(r) > 5 else None))
                      for r in d["retired"]),
        bd_events={k: (a, b) for k, a, b in d["bd"]},
    )


def estimate_json(est: Estimate | None) -> dict[str, Any] | None:
    return None if est is None else dataclasses.asdict(est)


def estimate_from_json(d: dict[str, Any] | None) -> Estimate | None:
    return None if d is None else Estimate(**d)
