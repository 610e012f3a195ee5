"""The driver core both commands stand on: the one packing function, the network ledger and the run folder's state."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator import config as cfgmod
from orchestrator.ledger import Ledger, NetworkResult, ResultIndex, StepTable
from orchestrator.plan import (
    NetworkPlan,
    load_jobs,
    network_spec,
    pack_memory,
    plan,
    plan_networks,
    plan_packs,
    save_jobs,
)
from orchestrator.runfolder import RunFolder
from workers.engine import NetMetrics, NetStatus, Report, Retired, derive_seed, to_dict
from workers.jobs import PackEvent, SpecTable

# Each per-network setting's way from its config key to its network, its MLflow param and a shared pack is
# tested for every NetworkSpec field in tests/orchestrator/test_schema.py.


def test_sweep_networks_carry_their_variants_settings() -> None:
    cfg = cfgmod.load(None, ["sweep.widths=[8]", "sweep.seeds=1",
                             "sweep.variants=[{name: a}, {name: b, set: {dynamics.temperature: 0.5, "
                             "dynamics.birth_death.rate: 2.0}}]"])
    by_variant = {n.variant: n.spec for n in plan_networks(cfg)}
    assert (by_variant["a"].temperature, by_variant["a"].bd_rate) == (0.0, 0.0)
    assert (by_variant["b"].temperature, by_variant["b"].bd_rate) == (0.5, 2.0)


def test_sweep_plan_builds_each_network_as_the_direct_loop_does() -> None:
    """The plan holds no network: each is built when asked, from the config and its id. Oracle: every
    network built the direct way (variant, then width, then replicate; its spec from the variant's config)."""
    cfg = cfgmod.load(None, ["sweep.widths=[8,32,128]", "sweep.seeds=3", "sweep.seed=7",
                             "sweep.variants=[{name: a}, {name: b, set: {dynamics.temperature: 0.5}}]"])
    want: list[NetworkPlan] = []
    for name, vcfg in cfg.variant_configs():
        for width in cfg.sweep.widths:
            for rep in range(cfg.sweep.seeds):
                spec = network_spec(vcfg, len(want), width, derive_seed(cfg.sweep.seed, rep))
                want.append(NetworkPlan(len(want), name, rep, spec, f"{name}/w{width:05d}/s{rep:02d}"))
    nets = plan_networks(cfg)
    assert len(nets) == len(want) == 18
    assert list(nets) == want and nets[-1] == want[-1] and nets[4:7] == want[4:7]
    assert [(*nets.variant_width(i), nets.group(i)) for i in range(len(nets))] == [
        (n.variant, n.spec.width, n.key.rsplit("/", 1)[0]) for n in want]
    with pytest.raises(IndexError):
        nets[len(want)]


def test_step_table_and_result_index_keep_a_sweep_in_flat_arrays() -> None:
    t = StepTable(3)
    assert [t.get(i) for i in (0, 2, 3, 10**6)] == [-1, -1, -1, -1]
    t[2], t[10**6] = 40, 7  # an id past the dense range (a search's) goes to the dict
    assert (t.get(2), t.get(10**6), t.get(1)) == (40, 7, -1)
    idx = ResultIndex(3)

    def rec(net_id: int, status: NetStatus, step: int, converged: bool | None, cap: int) -> NetworkResult:
        return NetworkResult(net_id, "k", "v", 8, 0, status.value, 0.1, step, "", 0.0, converged=converged, cap=cap)

    idx.record(rec(0, NetStatus.FINISHED, 100, False, 100), cap=200)  # stopped at an old, lower cap
    idx.record(rec(1, NetStatus.DIVERGED, 30, None, 200), cap=200)
    assert (idx.step(0), idx.step(1), idx.step(2)) == (100, 30, -1)
    assert (idx.settled(0), idx.settled(1), idx.settled(2), idx.n_settled) == (False, True, False, 1)
    idx.record(rec(0, NetStatus.FINISHED, 200, False, 200), cap=200)  # trained on to the cap in force
    assert (idx.step(0), idx.settled(0), idx.n_settled) == (200, True, 2)
    idx.record(rec(0, NetStatus.FINISHED, 200, False, 200), cap=200)  # the same again counts once
    assert idx.n_settled == 2


def test_spec_table_gives_back_the_specs_it_was_built_from() -> None:
    """A pack keeps its networks as columns; oracle: the spec objects themselves (mixed settings in one pack,
    as two variants differing in temperature share packs; a seed past 63 bits falls back to a list)."""
    cfg = cfgmod.load(None, ["sweep.widths=[8,64]", "sweep.seeds=2",
                             "sweep.variants=[{name: a}, {name: b, set: {dynamics.temperature: 0.5}}]"])
    specs = [n.spec for n in plan_networks(cfg)]
    specs.append(replace(specs[0], net_id=99, seed=2**64 + 5))
    table = SpecTable(specs)
    assert len(table) == len(specs) and list(table) == specs and table == tuple(specs) and tuple(specs) == table
    assert table[-1] == specs[-1] and table[2:5] == tuple(specs[2:5]) and hash(table) == hash(tuple(specs))
    assert pickle.loads(pickle.dumps(table)) == table and table != tuple(specs[:-1])
    with pytest.raises(IndexError):
        table[len(specs)]
    nets = plan_networks(cfg)
    (job,) = plan_packs(cfg, nets, n_workers=1, memory_bytes=1 << 34, checkpoint_dir=None)
    assert isinstance(job.networks, SpecTable) and list(job.networks) == sorted(specs[:-1], key=lambda s: s.net_id)


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


def test_plan_json_round_trips_and_reads_an_earlier_versions_file(tmp_path: Path) -> None:
    """plan.json is written a pack per line (streamed) and read back to the same jobs; a plan an earlier
    version wrote as one indented document still reads."""
    cfg = cfgmod.load(None, ["sweep.widths=[8,16,32]", "sweep.seeds=3",
                             "sweep.variants=[{name: a}, {name: b, set: {dynamics.temperature: 0.5}}]"])
    jobs = plan_packs(cfg, plan_networks(cfg), n_workers=3, memory_bytes=64 << 30, checkpoint_dir=tmp_path)
    assert len(jobs) >= 3
    save_jobs(jobs, tmp_path / "plan.json")
    lines = (tmp_path / "plan.json").read_text().splitlines()
    assert len(lines) == len(jobs) + 2 and json.loads("\n".join(lines)) is not None
    assert load_jobs(tmp_path / "plan.json") == jobs
    old = json.loads((tmp_path / "plan.json").read_text())
    assert old[0]["networks"] == [to_dict(n) for n in jobs[0].networks]
    (tmp_path / "old.json").write_text(json.dumps(old, indent=1))  # how earlier versions wrote it
    assert load_jobs(tmp_path / "old.json") == jobs
    assert not list(tmp_path.glob("*.tmp"))


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

    def end_run(self, run_id: str, status: str = "FINISHED", *, release: bool = False) -> None:
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
