"""The real scaling sweep (plan, ledger, tracker, results.jsonl, analysis) on the simulated pool: what
``mfsweep scaling`` promises, checked against the planted curve, with the training replaced."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator import config as cfgmod
from orchestrator.config import ExecutionConfig
from orchestrator.plan import plan_networks, plan_packs
from orchestrator.scaling import ScalingSweep
from orchestrator.simpool import PlantedCurve, SimPool
from workers.engine import NetStatus
from workers.jobs import PackEvent, PackJob

WIDTHS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
STEPS, EVERY = 200, 10


def sweep_cfg(seeds: int, runs: str) -> cfgmod.ScalingConfig:
    return cfgmod.load(None, [
        "name=sim", "task.kind=teacher", "task.dim=4", "sweep.variants=[]", f"sweep.widths={WIDTHS}",
        f"sweep.seeds={seeds}", f"dynamics.steps={STEPS}", f"dynamics.eval_every={EVERY}",
        f"dynamics.stop.window={STEPS // 2}", "execution.backend=local", f"tracking.runs={runs}"])


@pytest.mark.parametrize(("seeds", "workers", "runs"), [(20, 8, "network"), (6, 4, "group")])
def test_sweep_on_simulated_pool(tmp_path: Path, seeds: int, workers: int, runs: str) -> None:
    """Every network in results.jsonl once; the summary's exponent is the planted one within its interval;
    MLflow gives back every network's run (or seed, in group runs) once, FINISHED, with its whole planted
    test-loss curve, every step once."""
    cfg = sweep_cfg(seeds, runs)
    curve = PlantedCurve()
    made: list[SimPool] = []

    def factory(ex: ExecutionConfig, address: str | None, py_modules: object) -> SimPool:
        made.append(SimPool(workers, curve=curve))
        return made[-1]

    out = tmp_path / "run"
    sweep = ScalingSweep(cfg, out, progress=False, pool_factory=factory)
    summary = sweep.run()
    nets = sweep.networks
    assert len(nets) == len(WIDTHS) * seeds and len(made) == 1 and made[0].n_workers == workers
    # Nothing per network is left in the driver: each network's run was forgotten once its end was stored.
    assert sweep.child == {} and sweep.tracker.runs_held == 1  # the parent

    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert Counter(r["net_id"] for r in lines) == Counter({n.net_id: 1 for n in nets})
    for r in lines:
        assert r["status"] == "finished" and r["step"] == STEPS and r["converged"] is True

    (v,) = summary["variants"]
    assert v["n_points"] == v["n_converged"] == len(nets)
    lo, hi = v["exponent_ci95"]
    assert lo <= curve.exponent <= hi and not lo <= -0.5 <= hi
    assert (out / "scaling.png").exists() and (out / "curves.png").exists()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = summary["mlflow"]["parent_run_id"]
    runs_back = client.search_runs([summary["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'",
                                   max_results=1000)
    keys = Counter(r.data.tags["mfsweep.key"] for r in runs_back)
    group = runs == "group"
    want = {n.key.rsplit("/", 1)[0] if group else n.key for n in nets}
    assert set(keys) == want and set(keys.values()) == {1}
    by_key = {r.data.tags["mfsweep.key"]: r for r in runs_back}
    for n in nets:
        run = by_key[n.key.rsplit("/", 1)[0] if group else n.key]
        assert run.info.status == "FINISHED"
        prefix = f"seed{n.replicate}/" if group else ""
        f = curve.factor(n.net_id)
        hist = client.get_metric_history(run.info.run_id, f"{prefix}test_loss")
        assert sorted((m.step, m.value) for m in hist) == [
            (t, curve.loss(n.spec.width, f, t)) for t in range(0, STEPS + 1, EVERY)]
        assert run.data.metrics[f"{prefix}final_loss_mean"] == pytest.approx(
            next(r["final_loss_mean"] for r in lines if r["net_id"] == n.net_id))


def test_simulated_pool_honours_the_contract(tmp_path: Path) -> None:
    """Reports in order per pack in the caller's thread, on_done after a job's last report (its jobs join
    the run), a prune request retiring one network early while its pack-mates go on."""
    cfg = sweep_cfg(2, "network")
    nets = plan_networks(cfg)
    pool = SimPool(3)
    try:
        jobs = plan_packs(cfg, nets, n_workers=4, memory_bytes=pool.memory_bytes, checkpoint_dir=None)
        first, later = jobs[:1], jobs[1:]
        victim = first[0].networks[0].net_id
        caller = threading.get_ident()
        steps: dict[int, list[int]] = {}
        ends: dict[int, tuple[NetStatus, int]] = {}
        done: list[str] = []

        def on_event(ev: PackEvent) -> None:
            assert threading.get_ident() == caller and ev.pack_id not in done
            for m in ev.report.metrics:
                steps.setdefault(m.net_id, []).append(m.step)
                if m.net_id == victim and m.step == 50:
                    pool.request_retire(ev.pack_id, victim, "pruned", "test prune")
            for r in ev.report.retired:
                assert r.net_id not in ends
                ends[r.net_id] = (r.status, r.step)

        def on_done(job: PackJob, failure: object) -> list[PackJob]:
            assert threading.get_ident() == caller and failure is None
            done.append(job.pack_id)
            return later if len(done) == 1 else []

        assert pool.run(first, on_event, on_done=on_done) == []
        assert sorted(done) == sorted(j.pack_id for j in jobs)
        assert set(ends) == {n.net_id for n in nets}
        # The request lands at the first report after it arrives (the worker may be ahead of the driver).
        status, at = ends[victim]
        assert status is NetStatus.PRUNED and 50 <= at < STEPS and steps[victim][-1] == at
        for nid, got in steps.items():
            if nid != victim:
                assert got == list(range(0, STEPS + 1, EVERY)) and ends[nid] == (NetStatus.FINISHED, STEPS)
    finally:
        pool.close()
