"""Elastic, preemption-safe runs on a real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head
that takes no actors and worker nodes of 1 CPU each, added and killed while sweeps run): nodes that join get
packs, losing every node makes the sweep wait (or exit 3 and resume), a preemption loop loses nothing and
duplicates nothing, and a SIGKILLed driver's local Ray processes are cleaned up by the next command."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import config as cfgmod
from orchestrator import localray
from orchestrator.plan import plan_networks, plan_packs
from orchestrator.pool import RayPool
from tests.conftest import free_port
from workers.engine import NetStatus
from workers.jobs import PackEvent, PackJob

from .support import ROOT

CONFIG = ROOT / "configs" / "scaling" / "teacher_relu.yaml"


def sets(widths: str, seeds: int, steps: int, every: int, per_pack: int, *extra: str) -> list[str]:
    return ["sweep.variants=[]", f"sweep.widths={widths}", f"sweep.seeds={seeds}", f"dynamics.steps={steps}",
            f"dynamics.eval_every={every}", "dynamics.batch_size=32", "task.n_test=128",
            f"execution.checkpoint_every={every}", f"execution.max_networks_per_pack={per_pack}",
            "execution.device=cpu", *extra]


class Driver:
    """``mfsweep`` in a subprocess; its output is collected line by line (tests wait on what it says)."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._said = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._said:
                self.lines.append(line)
                self._said.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_text(self, text: str, timeout: float) -> None:
        with self._said:
            ok = self._said.wait_for(lambda: text in self.output or self.proc.poll() is not None, timeout)
        assert ok and text in self.output, f"never said {text!r}:\n{self.output[-3000:]}"

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"driver did not end within {timeout} s:\n{self.output[-3000:]}")


def scaling(out: Path, address: str, sweep: list[str]) -> Driver:
    return Driver("scaling", str(CONFIG), *[x for s in sweep for x in ("--set", s)], "--out", str(out),
                  "--address", address, "--no-progress")


def wait_until(cond: Callable[[], bool], timeout: float, what: str, driver: Driver | None = None) -> None:
    """Poll a file-system condition (checkpoints, results lines) that a driver produces."""
    deadline = time.monotonic() + timeout
    while not cond():
        if driver is not None and driver.proc.poll() is not None:
            pytest.fail(f"driver ended before {what}:\n{driver.output[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def assert_all_finished_once(out: Path, n: int) -> None:
    recs = rows(out)
    assert sorted(r["net_id"] for r in recs) == list(range(n)), recs  # every network once, none twice
    assert all(r["status"] == "finished" for r in recs), [r for r in recs if r["status"] != "finished"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[object]:
    """A head node that takes no actors; each test adds (and removes) its own 1-CPU worker nodes. Quick
    health checks: a killed node is declared dead within seconds."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": free_port(),
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    try:
        yield c
    finally:
        c.shutdown()


def add_node(cluster: object) -> object:
    node = cluster.add_node(num_cpus=1, dashboard_agent_listen_port=free_port())  # type: ignore[attr-defined]
    cluster.wait_for_nodes()  # type: ignore[attr-defined]
    return node


def remove_workers(cluster: object) -> None:
    for node in list(cluster.worker_nodes):  # type: ignore[attr-defined]
        cluster.remove_node(node, allow_graceful=False)  # type: ignore[attr-defined]


def test_nodes_that_join_get_packs(cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker node at the start; two join after the first report: they run packs, and every network
    finishes once. The autoscaler is asked for the packs' need, up to max_workers (here no autoscaler runs:
    the requests are recorded where they would go). The first node holds one pack with no step cap to speak
    of until both new nodes have reported (then its networks are retired as finished), so the other packs wait
    for the new nodes however slowly they start."""
    import orchestrator.pool as pool_mod

    asked: list[list[dict]] = []
    monkeypatch.setattr(pool_mod, "request_resources", lambda bundles: asked.append(bundles))
    add_node(cluster)
    cfg = cfgmod.load(CONFIG, sets("[8,16,32,64]", 4, 1500, 100, 1))
    pool = RayPool(cluster.address, device="cpu", max_retries=0, wait_for_workers_s=120,  # type: ignore[attr-defined]
                   max_workers=2)
    joined: list[object] = []
    node_of: dict[str, str] = {}
    finished: list[int] = []
    try:
        assert pool.n_workers == 1
        nets = plan_networks(cfg)
        jobs = plan_packs(cfg, nets, n_workers=pool.plan_workers, memory_bytes=pool.memory_bytes,
                          checkpoint_dir=tmp_path / "ck")
        assert len(jobs) == 16
        from dataclasses import replace

        held = replace(jobs[0], dynamics=replace(jobs[0].dynamics, steps=10**8))
        jobs = [held, *jobs[1:]]  # the first node takes it first (one worker, queue order)
        others = {s.net_id for j in jobs[1:] for s in j.networks}
        released: list[bool] = []
        deadline = [float("inf")]  # a pool that starves the new nodes fails in 2 minutes, not at pytest's timeout

        def on_event(ev: PackEvent) -> None:
            if not joined:
                joined.extend(add_node(cluster) for _ in range(2))
                deadline[0] = time.monotonic() + 120
            node_of.setdefault(ev.pack_id, pool.worker_nodes[ev.worker])
            finished.extend(r.net_id for r in ev.report.retired if r.status is NetStatus.FINISHED)
            # Both new nodes reported (or, if a bug starves one, every other pack is done): end the held pack.
            both = {n.node_id for n in joined} <= set(node_of.values())  # type: ignore[attr-defined]
            if not released and (both or others <= set(finished) or time.monotonic() > deadline[0]):
                released.append(both)
                for spec in held.networks:
                    pool.request_retire(held.pack_id, spec.net_id, "finished", "test: the new nodes got packs")

        assert pool.run(jobs, on_event) == []
        assert sorted(finished) == [n.net_id for n in nets]  # every network once
        new = {n.node_id for n in joined}  # type: ignore[attr-defined]
        per_node = {nd: sum(1 for v in node_of.values() if v == nd) for nd in set(node_of.values())}
        assert new <= set(per_node), per_node  # both new nodes ran packs
        assert released == [True]
        assert pool.n_workers == 3  # max_workers bounds the request, not the workers that join
    finally:
        pool.close()
        remove_workers(cluster)
    assert asked[0] == [{"CPU": 1.0}] * 2  # 16 packs to run: as many workers as max_workers allows
    assert all(len(b) <= 2 for b in asked)
    assert asked[-1] == []  # withdrawn at the end


def test_workers_that_join_with_nothing_queued_ask_for_work(cluster: object, tmp_path: Path) -> None:
    """What an asynchronous search relies on: with nothing queued, workers that join call ``on_idle``, and
    the jobs it returns run on them."""
    add_node(cluster)
    cfg = cfgmod.load(CONFIG, sets("[8,16,32]", 1, 3000, 100, 1))
    pool = RayPool(cluster.address, device="cpu", max_retries=0, wait_for_workers_s=120)  # type: ignore[attr-defined]
    joined: list[object] = []
    idle_calls: list[int] = []
    node_of: dict[str, str] = {}
    try:
        nets = plan_networks(cfg)
        first, *more = plan_packs(cfg, nets, n_workers=3, memory_bytes=pool.memory_bytes,
                                  checkpoint_dir=tmp_path / "ck")
        assert len(more) == 2
        # The first job runs until the extra ones have ended (then it is told to stop, as pruning would).
        first = replace(first, dynamics=replace(first.dynamics, steps=10**7))
        extra = {j.pack_id for j in more}

        def on_event(ev: PackEvent) -> None:
            if not joined:
                joined.extend(add_node(cluster) for _ in range(2))
            node_of.setdefault(ev.pack_id, pool.worker_nodes[ev.worker])

        def on_idle(n: int) -> list:
            idle_calls.append(n)
            give = more[:n]
            del more[:n]
            return give

        def on_done(job: PackJob, failure: object) -> list:
            extra.discard(job.pack_id)
            if not extra:
                pool.request_retire(first.pack_id, first.networks[0].net_id, "pruned", "test: extras done")
            return []

        assert pool.run([first], on_event, on_done=on_done, on_idle=on_idle) == []
        assert idle_calls and not more  # asked, and the extra jobs ran
        new = {n.node_id for n in joined}  # type: ignore[attr-defined]
        assert sum(1 for nd in node_of.values() if nd in new) >= 1, node_of
        assert len(node_of) == 3
    finally:
        pool.close()
        remove_workers(cluster)


def test_losing_every_node_waits_for_a_new_one(cluster: object, tmp_path: Path) -> None:
    add_node(cluster)
    out = tmp_path / "wait"
    drv = scaling(out, cluster.address, sets("[8,16,32,64]", 2, 1500, 100, 2))  # type: ignore[attr-defined]
    try:
        wait_until(lambda: any((out / "checkpoints").glob("*.pt")), 240, "a checkpoint", drv)
        assert len(rows(out)) < 8
        remove_workers(cluster)
        drv.wait_for_text("waiting for workers", 120)
        add_node(cluster)
        assert drv.wait(300) == 0, drv.output[-3000:]
    finally:
        if drv.proc.poll() is None:
            drv.proc.kill()
        remove_workers(cluster)
    assert "worker died" in drv.output
    assert_all_finished_once(out, 8)  # no FAILED row


def test_no_worker_for_too_long_exits_3_and_resumes(cluster: object, tmp_path: Path) -> None:
    add_node(cluster)
    out = tmp_path / "gone"
    drv = scaling(out, cluster.address,  # type: ignore[attr-defined]
                  sets("[8,16,32,64]", 2, 1500, 100, 2, "execution.wait_for_workers_s=2"))
    try:
        wait_until(lambda: any((out / "checkpoints").glob("*.pt")), 240, "a checkpoint", drv)
        remove_workers(cluster)
        assert drv.wait(120) == 3, drv.output[-3000:]
        # mfsweep says it once, on one line, and nothing of its own follows (no traceback). Not "its last line":
        # Ray forwards its raylet's and GCS's log lines (some of several lines) to the driver's stderr
        # asynchronously, so they may land after it.
        lines = drv.output.splitlines()
        said = [i for i, ln in enumerate(lines) if f"resume with: mfsweep resume {out}" in ln]
        assert len(said) == 1 and "none recorded as failed" in lines[said[0]], drv.output[-3000:]
        assert not any(ln.startswith("Traceback") for ln in lines[said[0]:]), drv.output[-3000:]
        assert len(rows(out)) < 8 and all(r["status"] == "finished" for r in rows(out))
        add_node(cluster)
        again = Driver("resume", str(out), "--address", cluster.address, "--no-progress")  # type: ignore[attr-defined]
        assert again.wait(300) == 0, again.output[-3000:]
    finally:
        remove_workers(cluster)
    assert_all_finished_once(out, 8)


def test_preemption_loop_loses_and_duplicates_nothing(cluster: object, tmp_path: Path) -> None:
    """200 small networks while worker nodes are killed at random and replaced, one kill per 16 results (a
    result burst is one pack of 8, so every other pack to finish triggers a kill)."""
    from mlflow import MlflowClient

    steps, every, n, per_kill = 300, 20, 200, 16
    nodes = [add_node(cluster), add_node(cluster)]
    out = tmp_path / "spot"
    drv = scaling(out, cluster.address, sets("[4,8]", 100, steps, every, 8))  # type: ignore[attr-defined]
    rng = random.Random(0)
    kills = 0
    try:
        seen = 0
        while drv.proc.poll() is None:
            wait_until(lambda s=seen: len(rows(out)) >= s + per_kill or drv.proc.poll() is not None, 300, "results")
            seen = len(rows(out))
            if drv.proc.poll() is None and seen < n - per_kill:
                nodes.append(add_node(cluster))  # the replacement joins, then a random node is preempted
                victim = nodes.pop(rng.randrange(len(nodes) - 1))
                cluster.remove_node(victim, allow_graceful=False)  # type: ignore[attr-defined]
                kills += 1
        assert drv.wait(10) == 0, drv.output[-3000:]
    finally:
        remove_workers(cluster)
    assert kills >= 3
    assert "worker died" in drv.output  # kills hit running packs, which ran again from their checkpoints
    assert_all_finished_once(out, n)
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent = summary["mlflow"]["parent_run_id"]
    runs = client.search_runs([summary["mlflow"]["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    assert len(runs) == n
    for run in runs:
        got = [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")]
        assert sorted(got) == list(range(0, steps + 1, every)), run.info.run_name  # no point twice, none lost


def test_killed_drivers_local_ray_is_cleaned_up(tmp_path: Path) -> None:
    """A driver with its own local Ray is SIGKILLed; the next command stops the Ray processes it left (and
    says so), and only those."""
    out = tmp_path / "orphan"
    drv = Driver("scaling", str(CONFIG), *[x for s in sets("[8,16]", 2, 100000, 100, 2,
                                                           "execution.workers=1") for x in ("--set", s)],
                 "--out", str(out), "--no-progress")
    record = localray.registry() / f"{drv.proc.pid}.json"
    try:
        wait_until(lambda: any((out / "checkpoints").glob("*.pt")), 240, "a checkpoint", drv)
        wait_until(record.exists, 10, "the driver's record of its Ray processes", drv)
        procs = json.loads(record.read_text())["procs"]
        assert procs
    finally:
        drv.proc.send_signal(signal.SIGKILL)
        drv.proc.wait()
    # The next command (here a tiny sweep on the local backend elsewhere) stops them and says so.
    nxt = Driver("scaling", str(CONFIG), *[x for s in sets("[8]", 1, 20, 10, 1, "execution.backend=local")
                                           for x in ("--set", s)], "--out", str(tmp_path / "next"), "--no-progress")
    assert nxt.wait(120) == 0, nxt.output[-3000:]
    said = [ln for ln in nxt.lines if "left behind" in ln]
    assert len(said) == 1 and f"pid {drv.proc.pid}" in said[0], nxt.output[-3000:]
    # SIGKILL is delivered asynchronously: wait for the processes to be gone.
    wait_until(lambda: not [pid for pid, t in procs if localray._alive(pid, t)], 30, "the processes to end")
    assert not record.exists()
