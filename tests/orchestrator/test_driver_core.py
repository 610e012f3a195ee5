"""The driver core both commands stand on: the one packing function, the network ledger and the run folder's state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import config as cfgmod
from orchestrator.ledger import Ledger
from orchestrator.plan import (
    pack_memory,
    plan,
    plan_networks,
    plan_packs,
)
from orchestrator.runfolder import RunFolder
from workers.engine import NetMetrics, NetStatus, Report, Retired
from workers.jobs import PackEvent

# Each per-network setting's way from its config key to its network, its MLflow param and a shared pack is
# tested for every NetworkSpec field in tests/orchestrator/test_schema.py.


def test_sweep_networks_carry_their_variants_settings() -> None:
    cfg = cfgmod.load(None, ["sweep.widths=[8]", "sweep.seeds=1",
                             "sweep.variants=[{name: a}, {name: b, set: {dynamics.temperature: 0.5, "
                             "dynamics.birth_death.rate: 2.0}}]"])
    by_variant = {n.variant: n.spec for n in plan_networks(cfg)}
    assert (by_variant["a"].temperature, by_variant["a"].bd_rate) == (0.0, 0.0)
    assert (by_variant["b"].temperature, by_variant["b"].bd_rate) == (0.5, 2.0)


def test_plan_reports_too_wide_networks_and_packs_the_rest() -> None:
    """Search's use: a network too wide for a worker is named with a reason, not raised; scaling's wrapper
    makes it a one-line ConfigError."""
    cfg = cfgmod.load(None, ["sweep.widths=[8,16,100000000]", "sweep.seeds=2", "sweep.variants=[]"])
    nets = plan_networks(cfg)
    mem = pack_memory(cfg)
    memory = int(mem([16, 16, 8, 8]) / cfg.execution.memory_fraction) + 1  # all the small ones fit one pack
    packing = plan([(cfg, n.spec) for n in nets], n_workers=1, memory_bytes=memory, execution=cfg.execution,
                   data_seed=5, pack_id=lambda i: f"x{i}")
    assert sorted(sp.width for sp, _ in packing.too_wide) == [100000000, 100000000]
    assert all("a worker may use" in why for _, why in packing.too_wide)
    (job,) = packing.jobs
    assert (job.pack_id, job.data_seed) == ("x0", 5)
    assert sorted(sp.width for sp in job.networks) == [8, 8, 16, 16]
    with pytest.raises(cfgmod.ConfigError, match="width 100000000 needs"):
        plan_packs(cfg, nets, n_workers=1, memory_bytes=memory, checkpoint_dir=None)


def test_plan_spreads_over_workers_within_memory() -> None:
    cfg = cfgmod.load(None, ["sweep.widths=[8,16,32,64]", "sweep.seeds=2", "sweep.variants=[]"])
    nets = plan_networks(cfg)
    entries = [(cfg, n.spec) for n in nets]
    big = 64 << 30
    kw: dict[str, Any] = {"memory_bytes": big, "execution": cfg.execution, "data_seed": 0,
                          "pack_id": lambda i: f"p{i}"}
    assert len(plan(entries, n_workers=1, **kw).jobs) == 1
    four = plan(entries, n_workers=4, **kw).jobs
    assert len(four) == 4
    assert sorted(sp.net_id for j in four for sp in j.networks) == [n.net_id for n in nets]
    loads = [sum(sp.width for sp in j.networks) for j in four]
    assert max(loads) - min(loads) <= 8  # LPT over 64,64,32,32,16,16,8,8: loads 64,64,56,56
    assert [j.pack_id for j in plan_packs(cfg, nets, n_workers=4, memory_bytes=big, checkpoint_dir=None)] == \
        sorted(f"p{i:04d}" for i in range(4))


# --------------------------------------------------------------------------- the ledger


class FakeTracker:
    def __init__(self) -> None:
        self.points: list[tuple[str, int, float]] = []
        self.ended: list[tuple[str, str]] = []
        self.tags: dict[str, dict[str, str]] = {}
        self.stored: dict[str, dict[str, int]] = {}
        """A resumed session's runs: the largest step their store holds per metric."""

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        self.points.append((run_id, step, metrics.get("test_loss", metrics.get("final", float("nan")))))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.tags.setdefault(run_id, {}).update(tags)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.ended.append((run_id, status))

    def stored_steps(self, run_id: str) -> dict[str, int]:
        return self.stored.get(run_id, {})


class Recorder:
    def __init__(self, ours: set[int]) -> None:
        self.ours = ours
        self.points: list[tuple[int, int, int]] = []
        self.ends: list[tuple[int, int]] = []

    def run_of(self, net_id: int) -> str | None:
        return f"run{net_id}" if net_id in self.ours else None

    def on_point(self, ev: PackEvent, m: NetMetrics, prev_step: int) -> None:
        self.points.append((m.net_id, m.step, prev_step))

    def on_end(self, r: Retired, ev: PackEvent) -> None:
        self.ends.append((r.net_id, r.step))


def event(step: int, nets: tuple[int, ...], retired: tuple[int, ...] = ()) -> PackEvent:
    rep = Report(step, tuple(NetMetrics(n, step, None, 1.0 / (step + 1)) for n in nets),
                 tuple(Retired(n, step, NetStatus.FINISHED, "cap", 0.5) for n in retired), done=bool(retired))
    return PackEvent("p0", rep, "w", 0, 1.0)


def test_ledger_hands_each_point_and_end_on_once_and_drops_replays() -> None:
    tracker, policy = FakeTracker(), Recorder({1, 2})
    ledger = Ledger(tracker, policy)
    stream = [event(0, (1, 2, 3)), event(10, (1, 2, 3)),
              event(0, (1, 2)), event(10, (1, 2)),  # a pack trained again from scratch: replays
              event(20, (1, 2), retired=(2,)), event(20, (1, 2), retired=(2,)),  # a report log re-sent
              event(30, (1,), retired=(1,))]
    for ev in stream:
        ledger.on_event(ev)
    assert policy.points == [(1, 0, -1), (2, 0, -1), (1, 10, 0), (2, 10, 0), (1, 20, 10), (2, 20, 10),
                             (1, 30, 20)]
    assert [(run, step) for run, step, _ in tracker.points] == [(f"run{n}", s) for n, s, _ in policy.points]
    assert policy.ends == [(2, 20), (1, 30)]  # net 3 is not the policy's: nothing of it is recorded
    # A sweep extended to more steps ends a network again, later: that end is new.
    ledger.on_event(event(50, (2,), retired=(2,)))
    assert policy.ends[-1] == (2, 50) and ledger.step_of(2) == 50 and ledger.step_of(3) == 0
    ledger.close_run("run2", {"final": 0.25}, 50, {"mfsweep.status": "finished"}, "FINISHED")
    assert tracker.points[-1] == ("run2", 50, 0.25) and tracker.ended == [("run2", "FINISHED")]
    assert tracker.tags["run2"] == {"mfsweep.status": "finished"}


def test_run_folder_state_holds_no_password(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "out")
    assert folder.state() == {}
    with folder.hold("mfsweep test"):
        folder.write_state({"tracking_uri": "postgresql://me:s3cret@db/x", "storage": None, "name": "n"})
        folder.write_config("config.yaml", "name: n\n")
    text = (tmp_path / "out" / "state.json").read_text()
    assert "s3cret" not in text
    assert json.loads(text) == folder.state() == {"tracking_uri": "postgresql://me@db/x", "storage": None,
                                                  "name": "n"}
    assert (tmp_path / "out" / "config.yaml").read_text() == "name: n\n"
    assert folder.default_tracking_uri() == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"


def test_ledger_sends_a_resumed_run_only_what_its_store_lacks() -> None:
    """Across sessions a report log is re-sent from the start: the policy sees every point again (it rebuilds
    its curves and progress), the tracker only the steps the run does not store yet: dropped once, here."""
    tracker, policy = FakeTracker(), Recorder({1, 2})
    tracker.stored = {"run1": {"test_loss": 10}}  # run1 stored up to step 10 before the driver was killed
    ledger = Ledger(tracker, policy)
    for ev in [event(0, (1, 2)), event(10, (1, 2)), event(20, (1, 2), retired=(1,))]:
        ledger.on_event(ev)
    assert [(n, s) for n, s, _ in policy.points] == [(1, 0), (2, 0), (1, 10), (2, 10), (1, 20), (2, 20)]
    assert [(run, step) for run, step, _ in tracker.points] == [("run2", 0), ("run2", 10), ("run1", 20),
                                                                 ("run2", 20)]
    assert ledger.points_dropped == 2
    ledger.close_run("run1", {"final": 0.5}, 20, {}, "FINISHED")  # a new key at a new step: sent
    assert tracker.points[-1] == ("run1", 20, 0.5)
