"""The network ledger: where a report goes after the engine emits it.

Data path: config (config.py) -> plan (plan.py) -> pool (pool.py) -> actor (workers/actor.py) -> engine
(workers/engine/) -> **ledger** -> tracker (tracking/) -> analysis (analysis.py).

A pack's report reaches the driver as a :class:`~workers.jobs.PackEvent` (from the pool, or from the pack's
report log on resume: :meth:`Ledger.replay`). :meth:`Ledger.on_event` is the one place it is consumed:

* each network's points: a step at or below the last one handled this session is a replay (a pack trained
  again past its checkpoint, a report log re-sent after a worker's loss) and is dropped here; a new point goes
  to the policy (progress, curves, pruning) and, unless its run already stores that step (the run's stored
  steps, read once when a resumed session reopens it: a report log re-sent on resume), to the network's
  tracker run. This is the one place replays are dropped: the tracker writes what it is given
  (:meth:`Ledger.send` is the way in for every writer of curve points);
* each network's end (a :class:`~workers.engine.Retired`): dropped when the same end was handled already,
  else handed to the policy, which records it durably: ``mfsweep scaling`` appends it to ``results.jsonl``
  (:class:`ResultsFile`), ``mfsweep search`` tells Optuna. :meth:`Ledger.close_run` then finalizes the
  network's tracker run.

The policy (:class:`NetworkPolicy`) is what differs between the commands: which networks are its own, what
a new point means to it, and what to do when a network ends.
"""

from __future__ import annotations

import json
import os
import sys
from array import array
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from workers.engine import NetMetrics, NetStatus, Retired
from workers.jobs import PackEvent, PackJob
from workers.reportlog import read_events

from .pool import is_infrastructure_reason

__all__ = ["Ledger", "NetworkPolicy", "NetworkResult", "ResultIndex", "ResultsFile", "RunSink", "StepTable",
           "read_results"]


class StepTable:
    """One step per network id (-1: none): 8 bytes per id below ``dense`` (a sweep's ids, 0..n-1, in a flat
    array rather than a dict's ~100 bytes per entry), a dict for any other id (a search's trial-numbered ones)."""

    def __init__(self, dense: int = 0) -> None:
        self._flat = array("q", [-1]) * dense
        self._other: dict[int, int] = {}

    def get(self, net_id: int) -> int:
        if 0 <= net_id < len(self._flat):
            return self._flat[net_id]
        return self._other.get(net_id, -1)

    def __setitem__(self, net_id: int, step: int) -> None:
        if 0 <= net_id < len(self._flat):
            self._flat[net_id] = step
        else:
            self._other[net_id] = step


class RunSink(Protocol):
    """The tracker methods the ledger uses (:class:`orchestrator.tracking.Tracker`'s public ones)."""

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None: ...

    def end_run(self, run_id: str, status: str = "FINISHED", *, release: bool = False) -> None: ...

    def stored_steps(self, run_id: str) -> Mapping[str, int]: ...


class NetworkPolicy(Protocol):
    """What a command does with its networks' reports."""

    def run_of(self, net_id: int) -> str | None:
        """The network's tracker run; None: no network of this policy now (its reports are dropped)."""

    def on_point(self, ev: PackEvent, m: NetMetrics, prev_step: int) -> None:
        """A new point of a network, already sent to its run (``prev_step``: the last one before, -1)."""

    def on_end(self, r: Retired, ev: PackEvent) -> None:
        """A network ended: record it durably (the policy knows where)."""


class Ledger:
    """Consumes pack events for one driver session (see the module doc). Invariant: every point and every
    end reaches the tracker and the policy at most once per session, in report order."""

    def __init__(self, tracker: RunSink, policy: NetworkPolicy, networks: int = 0) -> None:
        """``networks``: ids 0..networks-1 are kept in flat arrays (:class:`StepTable`)."""
        self.tracker = tracker
        self.policy = policy
        self.last_step = StepTable(networks)
        """Per network, the last step whose point was handled."""
        self.ended_at = StepTable(networks)
        """Per network, the step of the last end handled (a sweep extended to more steps ends it again)."""
        self._stored: dict[str, Mapping[str, int]] = {}
        """Per reopened run (one that held points when this session first wrote to it), the largest step its
        store held per metric; a run with none is not kept (it holds nothing to drop)."""
        self._fresh: set[str] = set()
        """Runs of this session found empty at their first write, until their network ends (bounded by what
        is in flight)."""
        self.points_dropped = 0
        """Metric points not sent because their run stores them already."""

    def on_event(self, ev: PackEvent) -> None:
        rep = ev.report
        for m in rep.metrics:
            prev = self.last_step.get(m.net_id)
            if m.step <= prev:
                continue  # a replay: trained again past a checkpoint, or re-sent from a report log
            run = self.policy.run_of(m.net_id)
            if run is None:
                continue
            self.last_step[m.net_id] = m.step
            self.send(run, rep.values(m), m.step)
            self.policy.on_point(ev, m, prev)
        for r in rep.retired:
            if r.step <= self.ended_at.get(r.net_id):
                continue
            self.ended_at[r.net_id] = r.step
            self.policy.on_end(r, ev)

    def replay(self, job: PackJob) -> None:
        """Re-send a checkpointed pack's report log (what a killed driver may have received but not
        recorded); what was recorded already is dropped here and by the policy's durable record."""
        if job.checkpoint:
            for ev in read_events(job.checkpoint, job.pack_id):
                self.on_event(ev)

    def send(self, run: str, values: dict[str, float], step: int) -> None:
        """Points of ``run`` at ``step`` to the tracker, less those its store holds already (a run reopened by a
        resumed session: its stored steps are read once, at its first write here)."""
        stored = self._stored.get(run)
        if stored is None and run not in self._fresh:
            stored = dict(self.tracker.stored_steps(run))
            if stored:
                self._stored[run] = stored
            else:
                self._fresh.add(run)
        if stored:
            new = {k: v for k, v in values.items() if step > stored.get(k, -1)}
            self.points_dropped += len(values) - len(new)
            values = new
        if values:
            self.tracker.log_metrics(run, values, step)

    def step_of(self, net_id: int) -> int:
        """The last step of ``net_id`` handled this session (0: none)."""
        return max(0, self.last_step.get(net_id))

    def close_run(self, run: str, final: dict[str, float], step: int, tags: dict[str, str], status: str, *,
                  release: bool = False) -> None:
        """A network's final metrics, tags and status in its tracker run (idempotent unless ``release``: the
        caller will not write to the run again this session, and the tracker forgets it)."""
        if final:
            self.send(run, final, step)
        self.tracker.set_tags(run, tags)
        self.tracker.end_run(run, status, release=release)
        self._fresh.discard(run)  # ended: nothing more is written to it this session (a reopening rereads)
        if release:
            self._stored.pop(run, None)


# --------------------------------------------------------------------------- results.jsonl (mfsweep scaling)


@dataclass(frozen=True, slots=True)
class NetworkResult:
    """How one network ended (one line of results.jsonl)."""

    net_id: int
    key: str
    variant: str
    width: int
    replicate: int
    status: str
    final_test_loss: float | None
    """The last test loss."""
    step: int
    """The step the network stopped at (converged, capped, diverged, pruned)."""
    reason: str
    wall_s: float
    final_loss_mean: float | None = None
    """Mean test loss over the final window: the network's result."""
    final_loss_se: float | None = None
    """Its standard error (serial correlation of the reports accounted for)."""
    converged: bool | None = None
    """The plateau test passed over the final window (None: recorded by an older version)."""
    final_slope: float | None = None
    """d log L / d log t over the final window."""
    cap: int | None = None
    """dynamics.steps when this was recorded (a sweep extended to more steps records again)."""

    @property
    def result_loss(self) -> float | None:
        return self.final_loss_mean if self.final_loss_mean is not None else self.final_test_loss

    def settled(self, steps: int) -> bool:
        """Nothing left to train for a cap of ``steps``: it stopped for good (diverged, failed, pruned,
        converged) or already trained that far."""
        return (self.status != NetStatus.FINISHED.value or bool(self.converged) or self.cap is None
                or self.cap >= steps)


_REPEATED = ("variant", "status", "reason")


def read_results(path: Path) -> dict[int, NetworkResult]:
    """Results already recorded: per network the record of the largest cap (the sweep may have been
    extended), the first of equal caps (replays never record twice); a torn last line is ignored. A network
    that an earlier version failed because its workers were lost is not a result: it is trained again."""
    out: dict[int, NetworkResult] = {}
    if not path.exists():
        return out
    with path.open() as fh:  # line by line: a line per network end, 100k+ in a large sweep
        for line in fh:
            try:
                d = json.loads(line)
                for k in _REPEATED:  # a few distinct values in the whole file: one string each, not one per line
                    if isinstance(d.get(k), str):
                        d[k] = sys.intern(d[k])
                rec = NetworkResult(**d)
            except (json.JSONDecodeError, TypeError, AttributeError):
                continue
            if rec.status == NetStatus.FAILED.value and is_infrastructure_reason(rec.reason):
                continue
            old = out.get(rec.net_id)
            if old is None or (rec.cap or -1) > (old.cap or -1):
                out[rec.net_id] = rec
    return out


class ResultsFile:
    """``results.jsonl``: one line per network end, appended and fsynced before anything else hears of it
    (a finished network is never lost, whatever kills the driver after)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[int, NetworkResult]:
        return read_results(self.path)

    def append(self, res: NetworkResult) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(asdict(res)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class ResultIndex:
    """What a sweep's driver keeps of its recorded networks while it runs (9 bytes per network; the records
    themselves stay in results.jsonl): the step each record ended at, and whether the network is settled for
    the step cap in force (:meth:`NetworkResult.settled`)."""

    def __init__(self, networks: int) -> None:
        self._step = StepTable(networks)
        self._settled = bytearray(networks)
        self.n_settled = 0

    def record(self, res: NetworkResult, cap: int) -> None:
        """``res`` is now the network's record (``cap``: its variant's step cap in force)."""
        now = res.settled(cap)
        self.n_settled += int(now) - self._settled[res.net_id]
        self._settled[res.net_id] = now
        self._step[res.net_id] = res.step

    def step(self, net_id: int) -> int:
        """The step the network's record ended at; -1: none recorded."""
        return self._step.get(net_id)

    def settled(self, net_id: int) -> bool:
        return bool(self._settled[net_id])
