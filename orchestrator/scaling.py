"""The main job: an error-vs-width sweep on a worker pool, tracked in MLflow, fitted and plotted.

The sweep's policy on the shared driver core: what to run next (every network of the plan not yet settled,
packed by :func:`plan.plan_packs`) and what a network's end means (a line of results.jsonl: the ledger,
:mod:`.ledger`, hands it over); the fits, plots and summary are in :mod:`.scaling_report`.

Output folder layout (everything a resume needs):
    config.yaml     the resolved config            plan.json      the packs (stable across resumes)
    state.json      sweep key, tracking URI        results.jsonl  one line per network that ended
    checkpoints/    per pack: its state and its report log (workers/reportlog.py), re-sent on resume
    summary.json, scaling.png, curves.png
"""

from __future__ import annotations

import collections
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from workers.engine import NetMetrics, NetStatus, Retired
from workers.jobs import PackEvent, PackJob

from . import mlflow_view
from .config import ScalingConfig, dump
from .credentials import redact
from .curves import MeanCurves, curve_name
from .driver import Interrupted, PoolFactory, close_tracker, config_pool, open_pool, progress_bar, run_tags
from .ledger import Ledger, NetworkResult, ResultIndex, ResultsFile, read_results
from .plan import load_jobs, network_settings, plan_networks, plan_packs, save_jobs
from .pool import (
    JobFailure,
    Pool,
    PoolError,
    WorkersLost,
    close_in_background,
)
from .runfolder import RunFolder
from .runmeta import flatten, stop_on_signals
from .userdata import DataShipper

__all__ = ["Interrupted", "NetworkResult", "ScalingSweep", "default_out", "read_results"]


#: Config keys that ``mfsweep resume --set dynamics.steps=N`` changes (the quench grows with the cap).
_EXTENSION_KEYS = ("dynamics.steps", "dynamics.birth_death.quench", "sweep.variants")


def default_out(cfg: ScalingConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class ScalingSweep:
    """Runs (or resumes) one sweep into ``out``. Invariants: a network's result is recorded once; an MLflow
    point is logged at most once (steps at or below the last logged one are dropped).

    ``pool_factory`` makes the worker pool (default: the one ``cfg.execution`` asks for)."""

    def __init__(self, cfg: ScalingConfig, out: Path, *, tracking_uri: str | None = None,
                 address: str | None = None, console: Console | None = None, progress: bool = True,
                 pool_factory: PoolFactory = config_pool) -> None:
        self.cfg = cfg
        self.pool_factory = pool_factory
        self.out = out
        self.address = address
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.folder = RunFolder(out)
        state = self.folder.state()
        self.tracking_uri = tracking_uri or state.get("tracking_uri") or self.folder.default_tracking_uri()
        self.sweep_key = state.get("sweep_key") or uuid.uuid4().hex
        self.networks = plan_networks(cfg)
        """Every network, built when asked (the driver keeps no per-network plan)."""
        self.variants = cfg.variant_configs()
        self.cap = {name: v.dynamics.steps for name, v in self.variants}
        """Step cap per variant (each network's dynamics.steps)."""
        self.results_path = out / "results.jsonl"
        self.results_file = ResultsFile(self.results_path)
        self.results = self._index(self.results_file.read())
        self._wait_said: float | None = None
        self.curves = MeanCurves()
        """This session's test-loss curves, averaged over seeds per (variant, width) as they arrive."""
        self.child: dict[int, str] = {}
        """The tracker run of each network in flight (dropped when its run is finalized)."""
        self._finalized = bytearray(len(self.networks))
        """1: the network's run was finalized (ended and released) this session; it is not opened again."""
        self._members: collections.Counter[str] | None = None

    # ------------------------------------------------------------------ events
    def _child(self, net_id: int) -> str:
        run = self.child.get(net_id)
        if run is None:
            net = self.networks[net_id]
            v = dict(self.variants)[net.variant]
            sp = net.spec
            params = {
                "variant": net.variant, "width": sp.width, "replicate": net.replicate, "net_id": net_id,
                "unit": v.model.unit.value, "algorithm": v.dynamics.algorithm.value,
                "batch_size": v.dynamics.batch_size, "task": v.task.kind.value, "dim": v.task.dim,
                **network_settings(v),
            }
            if v.task.content_hash:
                params["content_hash"] = v.task.content_hash
            # The step cap is a tag, not a param: extending a sweep raises it, and MLflow params never change.
            tags = {"mfsweep.variant": net.variant, "mfsweep.steps": str(v.dynamics.steps)}
            if self.cfg.tracking.runs == "group":
                # One run per (variant, width); each seed's curves and tags under 'seed<r>/'.
                group = self.networks.group(net_id)
                for k in ("replicate", "net_id"):
                    params.pop(k)
                run = self.tracker.start_member(
                    self.parent, group, mlflow_view.group_run_name(net.variant, sp.width),
                    f"seed{net.replicate}", self._group_members()[group], params, {**tags, "mfsweep.key": group})
                self.tracker.set_tags(run, {"net_id": str(net_id), "key": net.key})
            else:
                name = mlflow_view.child_run_name(net.variant, sp.width, net.replicate)
                run = self.tracker.start_child(self.parent, net.key, name, params, {**tags, "mfsweep.key": net.key})
            self.child[net_id] = run
        return run

    def _group_members(self) -> dict[str, int]:
        """Per group run (tracking.runs: group), the networks that end in this session: those not settled
        when it began (a resumed or extended sweep's group run ends again when they have)."""
        if self._members is None:
            self._members = collections.Counter(
                self.networks.group(nid) for nid in range(len(self.networks)) if not self._settled(nid))
        return self._members

    def _index(self, records: dict[int, NetworkResult]) -> ResultIndex:
        """What the run keeps of ``records`` (results.jsonl's: read back in full only to report)."""
        index = ResultIndex(len(self.networks))
        for res in records.values():
            if 0 <= res.net_id < len(self.networks):  # (a record of another plan names no network here)
                index.record(res, self.cap[self.networks.variant(res.net_id)])
        return index

    def _settled(self, net_id: int) -> bool:
        return self.results.settled(net_id)

    def _n_settled(self) -> int:
        return self.results.n_settled

    # ------------------------------------------------------------------ the ledger's policy
    def run_of(self, net_id: int) -> str | None:
        return None if self._finalized[net_id] else self._child(net_id)

    def on_point(self, ev: PackEvent, m: NetMetrics, prev_step: int) -> None:
        variant, width = self.networks.variant_width(m.net_id)
        self._advance(width * (m.step - max(prev_step, 0)))
        self.curves.add(curve_name(variant, width), m.net_id, m.step, m.test_loss)

    def on_end(self, r: Retired, ev: PackEvent) -> None:
        """Record a network's end in results.jsonl, once per cap."""
        old_step = self.results.step(r.net_id)
        if old_step >= 0 and (self._settled(r.net_id) or r.step <= old_step):
            return  # recorded already (re-sent from a report log, or the old cap's record of an extended run)
        net = self.networks[r.net_id]
        est = r.estimate
        cap = self.cap[net.variant]
        if r.status is NetStatus.FINISHED and not (est is not None and est.converged):
            # It stopped at the cap in force then: lower than now when a report log is re-sent after
            # `mfsweep resume --set dynamics.steps=N` raised it (the network still has steps to train).
            cap = min(cap, r.step)
        res = NetworkResult(
            r.net_id, net.key, net.variant, net.spec.width, net.replicate, r.status.value, r.final_test_loss,
            r.step, r.reason, round(ev.wall_s, 3),
            final_loss_mean=None if est is None else est.mean, final_loss_se=None if est is None else est.se,
            converged=None if est is None else est.converged, final_slope=None if est is None else est.slope,
            cap=cap)
        self._write(res)
        # Early stops (converged, diverged, pruned) complete their share of the progress bar.
        cap = self.cap[net.variant]
        self._advance(net.spec.width * max(0, cap - max(r.step, self.ledger.step_of(r.net_id))))

    def _fail(self, net_id: int, reason: str) -> None:
        net = self.networks[net_id]
        self._write(NetworkResult(net_id, net.key, net.variant, net.spec.width, net.replicate,
                                  NetStatus.FAILED.value, None, self.ledger.step_of(net_id), reason, 0.0,
                                  cap=self.cap[net.variant]))

    def _write(self, res: NetworkResult) -> None:
        self.results_file.append(res)  # durable before anything else hears of it
        self.results.record(res, self.cap[self.networks.variant(res.net_id)])
        self._finalize_run(res)
        self._advance(0.0)

    def _finalize_run(self, res: NetworkResult) -> None:
        """Final metrics, tags and status of a network's child run. Once the network is settled this is done
        once a session (on resume, a network whose replayed report log ended it is not finalized again), and
        the tracker then forgets the run, as does the sweep: memory is bounded by the networks in flight. (A
        network recorded at an old cap by a replayed log trains on to the new one: its run stays open.)"""
        if self._finalized[res.net_id]:
            return
        settled = self._settled(res.net_id)  # (results.jsonl holds ``res`` already)
        final = {"wall_time_s": res.wall_s, "final_step": float(res.step), "stop_step": float(res.step)}
        for key in ("final_test_loss", "final_loss_mean", "final_loss_se", "final_slope"):
            value = getattr(res, key)
            if value is not None:
                final[key] = value
        tags = {"mfsweep.status": res.status, "mfsweep.reason": res.reason[:500]}
        if res.converged is not None:
            tags["mfsweep.converged"] = str(res.converged).lower()
        self.ledger.close_run(self._child(res.net_id), final, res.step, tags,
                              "FINISHED" if res.status == NetStatus.FINISHED.value else "FAILED", release=settled)
        if settled:
            self._finalized[res.net_id] = 1
            self.child.pop(res.net_id, None)

    def _reconcile(self, jobs: list[PackJob]) -> None:
        """On resume, before any pack runs again: re-send every pack's report log (reports and network ends
        an earlier driver may have received but not recorded before it died), then finalize the runs of
        packs that are done. Points MLflow already holds are dropped by the tracker, results already in
        results.jsonl by :meth:`on_end`; the packs that run again continue from their checkpoints without
        replaying anything."""
        for job in jobs:
            self.ledger.replay(job)
        done = [job for job in jobs if all(self._settled(sp.net_id) for sp in job.networks)]
        if done:
            recorded = self.results_file.read()  # for this pass only (the run keeps just their index)
            for job in done:
                for sp in job.networks:
                    self._finalize_run(recorded[sp.net_id])

    def _on_wait(self, waited: float | None) -> None:
        """No worker alive: say so on the progress line (without one: at once, then once a minute)."""
        if self._progress is not None:
            desc = "training" if waited is None else f"waiting for workers {waited:.0f}s"
            self._progress.update(self._task_id, description=desc)
        if waited is None:
            self._wait_said = None
        elif not self.show_progress and (self._wait_said is None or waited - self._wait_said >= 60):
            self.console.print(f"waiting for workers ({waited:.0f} s, up to "
                               f"{self.cfg.execution.wait_for_workers_s:.0f} s)")
            self._wait_said = waited

    def _extended(self, jobs: list[PackJob]) -> list[PackJob]:
        """The jobs with their networks' current step cap (``mfsweep resume DIR --set dynamics.steps=N``
        raises it; the pack then continues from its checkpoint)."""
        out = []
        for job in jobs:
            dyn = dict(self.variants)[self.networks.variant(job.networks[0].net_id)].dynamics.spec()
            out.append(job if dyn.steps == job.dynamics.steps else replace(job, dynamics=dyn))
        return out

    def _advance(self, amount: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=amount,
                                  networks=f"{self._n_settled()}/{len(self.networks)}")

    # ------------------------------------------------------------------ run
    def _open_tracking(self) -> None:
        """Tracker (fails fast on an unreachable server), parent run, resolved config artifact."""
        from .tracking import Tracker  # imported here: mlflow's import (~1 s) overlaps Ray's boot

        cfg = self.cfg
        self.tracker = Tracker(self.tracking_uri, cfg.name,
                               experiment_tags={mlflow_view.NOTE_TAG: mlflow_view.SCALING_EXPERIMENT_NOTE})
        self.ledger = Ledger(self.tracker, self, len(self.networks))
        params = flatten(cfg.model_dump(mode="json"))
        # What extending a sweep changes goes into tags (MLflow params never change).
        moving = {f"config.{k}": str(params.pop(k)) for k in _EXTENSION_KEYS if k in params}
        self.parent = self.tracker.start_parent(
            mlflow_view.parent_run_name(cfg.name, "sweep"), params,
            {**moving, **run_tags("scaling", self.sweep_key, self.out)})
        self.tracker.log_artifact(self.parent, self.out / "config.yaml")

    def run(self) -> dict[str, Any]:
        """Hold the output folder (one driver at a time), write its state, run the sweep."""
        with self.folder.hold("mfsweep scaling"):
            self.folder.write_state({"sweep_key": self.sweep_key, "tracking_uri": self.tracking_uri,
                                     "name": self.cfg.name})
            self.folder.write_config("config.yaml", dump(self.cfg))
            self.results = self._index(self.results_file.read())  # as of now that the folder is ours
            return self._run()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        ex = cfg.execution
        self._progress: Progress | None = None
        plan_path = self.out / "plan.json"
        todo = len(self.networks) - self._n_settled()
        stop = threading.Event()
        failures: list[JobFailure] = []
        pool: Pool | None = None
        closer: threading.Thread | None = None
        try:
            if todo:
                pool = open_pool(ex, self.address, (v.task for _, v in self.variants), self._open_tracking,
                                 self.pool_factory)
            else:
                self._open_tracking()
            if plan_path.exists():  # a resume
                self._reconcile(load_jobs(plan_path))
            if pool is not None:
                if plan_path.exists():
                    planned = self._extended(load_jobs(plan_path))
                    save_jobs(planned, plan_path)
                    jobs = [j for j in planned if any(not self._settled(sp.net_id) for sp in j.networks)]
                else:
                    jobs = plan_packs(cfg, self.networks, n_workers=pool.plan_workers,
                                      memory_bytes=pool.memory_bytes, checkpoint_dir=self.out / "checkpoints",
                                      skip={n for n in range(len(self.networks)) if self._settled(n)})
                    save_jobs(jobs, plan_path)
                shipper = DataShipper()  # a dataset's arrays: read once here, to the workers via the object store
                jobs = [shipper.attach(j) for j in jobs]
                self.console.print(
                    f"[bold]{cfg.name}[/]: {todo} networks in {len(jobs)} packs on {pool.n_workers} "
                    f"{pool.device} worker(s); MLflow {redact(self.tracking_uri)}", soft_wrap=True)
                # Where the numbers came from: the workers' devices and nodes (timings depend on them).
                self.tracker.set_tags(self.parent, {
                    "mfsweep.workers": f"{pool.n_workers} x {pool.device}",
                    "mfsweep.worker_nodes": str(len({w.node for w in pool.workers})),
                    "mfsweep.worker_device_names": ", ".join(sorted({w.device for w in pool.workers}))})
                total = float(sum(sp.width * j.dynamics.steps
                                  for j in jobs for sp in j.networks if not self._settled(sp.net_id)))
                progress = progress_bar(self.console, self.show_progress, "networks")
                with progress, stop_on_signals(stop):
                    self._progress = progress
                    self._task_id = progress.add_task(
                        "training", total=total, networks=f"{self._n_settled()}/{len(self.networks)}")
                    try:
                        failures = pool.run(jobs, self.ledger.on_event, stop, on_wait=self._on_wait)
                    except WorkersLost as err:
                        self.tracker.flush()
                        raise PoolError(f"{err}; resume with: mfsweep resume {self.out}") from None
                    self._progress = None
                closer = close_in_background(pool)  # while the analysis runs
                pool = None
                for f in failures:  # a pack's own failure (lost workers never end up here)
                    for sp in f.job.networks:
                        if not self._settled(sp.net_id):
                            self._fail(sp.net_id, f.reason)
                if stop.is_set():
                    self.tracker.flush()
                    raise Interrupted(
                        f"interrupted with {self._n_settled()}/{len(self.networks)} networks done; "
                        f"resume with: mfsweep resume {self.out}")
            summary = self._finish()
        finally:
            if pool is not None:
                pool.close()
            if closer is not None:
                closer.join(timeout=60)
            close_tracker(getattr(self, "tracker", None), self.console)
        return summary

    # ------------------------------------------------------------------ analysis
    def _finish(self) -> dict[str, Any]:
        # Loaded here: the fits and plots (scipy, matplotlib) are not on the way to the first training step.
        from .scaling_report import ScalingReport

        # The records come back from results.jsonl: the run kept only their index.
        return ScalingReport(self.cfg, self.out, self.tracker, self.parent, self.tracking_uri,
                             self.results_file.read(), self.variants, self.curves, self.cap).finish()
