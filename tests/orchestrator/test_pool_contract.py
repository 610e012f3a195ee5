"""One contract, two pools: LocalPool (one worker process, in lockstep) and RayPool (a real local Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import config as cfgmod
from orchestrator.plan import plan_networks, plan_packs
from orchestrator.pool import LocalPool, Pool, RayPool
from workers.engine import NetStatus, Pack
from workers.jobs import PackEvent

CFG = cfgmod.load(None, ["sweep.widths=[8,16,32]", "sweep.seeds=2", "dynamics.steps=40", "dynamics.eval_every=10",
                         "execution.checkpoint_every=10", "execution.max_networks_per_pack=2"])


@pytest.fixture(scope="module", params=["local", "ray"])
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    p: Pool = LocalPool("cpu", max_retries=1) if request.param == "local" else RayPool(workers=2, max_retries=1)
    yield p
    p.close()


def jobs_for(tmp_path: Path, pool: Pool):
    nets = plan_networks(CFG)
    return nets, plan_packs(CFG, nets, n_workers=pool.n_workers, memory_bytes=pool.memory_bytes,
                            checkpoint_dir=tmp_path / "ck")


def reference_losses() -> dict[int, float]:
    """The same networks trained in one in-process pack: the oracle both pools must reproduce."""
    nets = plan_networks(CFG)
    pack = Pack(CFG.task.spec(), CFG.model.spec(), CFG.dynamics.spec(), [n.spec for n in nets],
                data_seed=CFG.sweep.seed)
    out: dict[int, float] = {}
    for rep in pack.train():
        for r in rep.retired:
            assert r.final_test_loss is not None
            out[r.net_id] = r.final_test_loss
    return out


def test_every_report_arrives_in_order(pool: Pool, tmp_path: Path) -> None:
    nets, jobs = jobs_for(tmp_path, pool)
    assert len(jobs) >= 3  # max_networks_per_pack=2 splits the 6 networks
    events: list[PackEvent] = []
    failures = pool.run(jobs, events.append)
    assert failures == []
    steps: dict[int, list[int]] = {}
    final: dict[int, float] = {}
    for ev in events:
        for m in ev.report.metrics:
            steps.setdefault(m.net_id, []).append(m.step)
        for r in ev.report.retired:
            assert r.status is NetStatus.FINISHED
            assert r.final_test_loss is not None
            final[r.net_id] = r.final_test_loss
    assert set(final) == {n.net_id for n in nets}
    for sid in steps.values():
        assert sid == [0, 10, 20, 30, 40]  # every report, in order, once
    ref = reference_losses()
    for nid, loss in final.items():
        assert loss == pytest.approx(ref[nid], rel=1e-5)  # packing and placement do not change a network
    for job in jobs:  # the final state was checkpointed
        assert job.checkpoint is not None and Path(job.checkpoint).exists()


def test_prune_request_leaves_packmates(pool: Pool, tmp_path: Path) -> None:
    from dataclasses import replace

    _, jobs = jobs_for(tmp_path, pool)
    # Long enough that the request (asynchronous on Ray: it lands at the first report after it arrives)
    # reaches the pack well before the end.
    steps = 4000
    job = replace(jobs[0], dynamics=replace(jobs[0].dynamics, steps=steps))
    victim, mate = job.networks[0].net_id, job.networks[1].net_id
    seen: dict[int, list[int]] = {}
    retired = {}

    def on_event(ev: PackEvent) -> None:
        for m in ev.report.metrics:
            seen.setdefault(m.net_id, []).append(m.step)
            if m.net_id == victim and m.step == 10:
                pool.request_retire(ev.pack_id, victim, "pruned", "test prune")
        for r in ev.report.retired:
            retired[r.net_id] = r

    assert pool.run([job], on_event) == []
    assert retired[victim].status is NetStatus.PRUNED
    assert retired[victim].reason == "test prune"
    assert max(seen[victim]) < steps  # it left before the end
    if isinstance(pool, LocalPool):
        assert max(seen[victim]) == 10  # lockstep: at the very next report
    assert retired[mate].status is NetStatus.FINISHED and seen[mate][-1] == steps


def test_failing_job_is_reported(pool: Pool, tmp_path: Path) -> None:
    _, jobs = jobs_for(tmp_path, pool)
    bad = jobs[0]
    # A checkpoint path inside a file cannot be written: the worker raises on its first save.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    from dataclasses import replace

    bad = replace(bad, checkpoint=str(blocker / "sub" / "ck.pt"))
    failures = pool.run([bad, jobs[1]], lambda ev: None)
    assert [f.job.pack_id for f in failures] == [bad.pack_id]
    assert failures[0].reason  # a reason, not an empty string


def test_on_done_follows_last_report_and_adds_jobs(pool: Pool, tmp_path: Path) -> None:
    """on_done comes once per job, after the job's last report, in the caller's thread; the jobs it returns
    run in the same call (a failing one is reported to on_done with its failure)."""
    import threading
    from dataclasses import replace

    _, jobs = jobs_for(tmp_path, pool)
    first, later = jobs[:1], jobs[1:]
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    bad = replace(later[0], pack_id="bad", checkpoint=str(blocker / "sub" / "ck.pt"))
    caller = threading.get_ident()
    order: list[tuple[str, str]] = []  # ("event" | "done", pack_id)
    ended: dict[str, str | None] = {}
    handed_out = [False]

    def on_event(ev: PackEvent) -> None:
        assert threading.get_ident() == caller
        assert ev.pack_id not in ended  # no report after its job's end
        order.append(("event", ev.pack_id))

    def on_done(job, failure):  # type: ignore[no-untyped-def]
        assert threading.get_ident() == caller and job.pack_id not in ended
        ended[job.pack_id] = None if failure is None else failure.reason
        order.append(("done", job.pack_id))
        if handed_out[0]:
            return []
        handed_out[0] = True  # the first job to end hands out the rest, one of which fails
        return [*later, bad]

    failures = pool.run(first, on_event, on_done=on_done)
    assert set(ended) == {j.pack_id for j in jobs} | {"bad"}
    assert [f.job.pack_id for f in failures] == ["bad"] and ended["bad"]
    assert all(ended[j.pack_id] is None for j in jobs)
    for j in jobs:  # every good job reported before its end
        assert ("event", j.pack_id) in order
        assert order.index(("done", j.pack_id)) > max(i for i, x in enumerate(order) if x == ("event", j.pack_id))
