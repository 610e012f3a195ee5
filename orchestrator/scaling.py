"""The main job: an error-vs-width sweep on a worker pool, tracked in MLflow, fitted and plotted.

Output folder layout (everything a resume needs):
    config.yaml     the resolved config            plan.json      the packs (stable across resumes)
    state.json      sweep key, tracking URI        results.jsonl  one line per network that ended
    checkpoints/    one file per pack              summary.json, scaling.png, curves.png
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from workers.engine import NetMetrics, NetStatus, Pack, Report
from workers.jobs import PackEvent, PackJob

from . import analysis
from .config import ScalingConfig, dump
from .plan import NetworkPlan, load_jobs, plan_networks, plan_packs, save_jobs
from .pool import JobFailure, Pool, close_in_background, make_pool, open_beside
from .userdata import DataShipper, modules_for_workers


@dataclass(frozen=True)
class NetworkResult:
    """How one network ended (one line of results.jsonl)."""

    net_id: int
    key: str
    variant: str
    width: int
    replicate: int
    status: str
    final_test_loss: float | None
    step: int
    reason: str
    wall_s: float


class Interrupted(RuntimeError):
    """The sweep was stopped (Ctrl-C / SIGTERM) before it finished; it can be resumed."""


def default_out(cfg: ScalingConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or None
    except Exception:
        return None


def _versions() -> dict[str, str]:
    # Versions from package metadata: importing mlflow/optuna here would break the module boundaries.
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "optuna", "mlflow", "mfsweep"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "none"
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def read_results(path: Path) -> dict[int, NetworkResult]:
    """Results already recorded (first record of a network wins; a torn last line is ignored)."""
    out: dict[int, NetworkResult] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = NetworkResult(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        out.setdefault(rec.net_id, rec)
    return out


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C / SIGTERM set ``stop`` (the pool winds down and everything recorded so far is kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class ScalingSweep:
    """Runs (or resumes) one sweep into ``out``. Invariants: a network's result is recorded once; an MLflow
    point is logged at most once (steps at or below the last logged one are dropped)."""

    def __init__(self, cfg: ScalingConfig, out: Path, *, tracking_uri: str | None = None,
                 address: str | None = None, console: Console | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.out = out
        self.address = address
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        out.mkdir(parents=True, exist_ok=True)
        state_path = out / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        default_uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.tracking_uri = tracking_uri or state.get("tracking_uri") or default_uri
        self.sweep_key = state.get("sweep_key") or uuid.uuid4().hex
        state_path.write_text(json.dumps({"sweep_key": self.sweep_key, "tracking_uri": self.tracking_uri,
                                          "name": cfg.name}, indent=1))
        (out / "config.yaml").write_text(dump(cfg))
        self.networks = plan_networks(cfg)
        self.by_id: dict[int, NetworkPlan] = {n.net_id: n for n in self.networks}
        self.results_path = out / "results.jsonl"
        self.results = read_results(self.results_path)
        self.last_step: dict[int, int] = {}
        self.curves: dict[int, list[tuple[int, float]]] = {}
        self.child: dict[int, str] = {}

    # ------------------------------------------------------------------ events
    def _child(self, net_id: int) -> str:
        run = self.child.get(net_id)
        if run is None:
            net = self.by_id[net_id]
            v = dict(self.variants)[net.variant]
            sp = net.spec
            params = {
                "variant": net.variant, "width": sp.width, "replicate": net.replicate, "net_id": net_id,
                "unit": v.model.unit.value, "parametrization": sp.parametrization.value,
                "algorithm": v.dynamics.algorithm.value, "lr": sp.lr, "steps": v.dynamics.steps,
                "batch_size": v.dynamics.batch_size, "temperature": sp.temperature,
                "bd_rate": sp.bd_rate, "bd_scheme": sp.bd_scheme.value, "task": v.task.kind.value,
                "dim": v.task.dim,
            }
            if v.task.content_hash:
                params["content_hash"] = v.task.content_hash
            run = self.tracker.start_child(self.parent, net.key, net.key, params,
                                           {"mfsweep.key": net.key, "mfsweep.variant": net.variant})
            self.child[net_id] = run
        return run

    def _on_event(self, ev: PackEvent) -> None:
        rep = ev.report
        for m in rep.metrics:
            self._log_point(m, rep)
        for r in rep.retired:
            self._record(r.net_id, r.status.value, r.final_test_loss, r.step, r.reason, ev.wall_s)

    def _log_point(self, m: NetMetrics, rep: Report) -> None:
        prev = self.last_step.get(m.net_id, -1)
        if m.step <= prev:
            return  # replayed after a restart from a checkpoint
        width = self.by_id[m.net_id].spec.width
        self._advance(width * (m.step - max(prev, 0)))
        self.last_step[m.net_id] = m.step
        # The tracker drops steps MLflow already has, so replays after a crash never log twice.
        self.tracker.log_metrics(self._child(m.net_id), rep.values(m), m.step)
        self.curves.setdefault(m.net_id, []).append((m.step, m.test_loss))

    def _record(self, net_id: int, status: str, loss: float | None, step: int, reason: str, wall: float) -> None:
        if net_id in self.results:
            return
        net = self.by_id[net_id]
        res = NetworkResult(net_id, net.key, net.variant, net.spec.width, net.replicate, status,
                            loss, step, reason, round(wall, 3))
        with self.results_path.open("a") as fh:  # append + fsync: a finished network is never lost
            fh.write(json.dumps(asdict(res)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.results[net_id] = res
        self._finalize_run(res)
        self._advance(0.0)

    def _finalize_run(self, res: NetworkResult) -> None:
        """Final metrics, tags and status of a network's child run (idempotent)."""
        run = self._child(res.net_id)
        final = {"wall_time_s": res.wall_s, "final_step": float(res.step)}
        if res.final_test_loss is not None:
            final["final_test_loss"] = res.final_test_loss
        self.tracker.log_metrics(run, final, res.step)
        self.tracker.set_tags(run, {"mfsweep.status": res.status, "mfsweep.reason": res.reason[:500]})
        self.tracker.end_run(run, "FINISHED" if res.status == NetStatus.FINISHED.value else "FAILED")

    def _reconcile(self, jobs: list[PackJob]) -> None:
        """After a crash, re-send what durable records hold for packs that will not run again (their
        checkpointed reports, their results), so MLflow ends complete; the tracker drops duplicates."""
        for job in jobs:
            if not all(sp.net_id in self.results for sp in job.networks):
                continue  # a pack that runs again replays its own history
            if job.checkpoint and Path(job.checkpoint).exists():
                for rep in Pack.read_history(job.checkpoint):
                    for m in rep.metrics:
                        self._log_point(m, rep)
            for sp in job.networks:
                self._finalize_run(self.results[sp.net_id])

    def _advance(self, amount: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, advance=amount,
                                  networks=f"{len(self.results)}/{len(self.networks)}")

    # ------------------------------------------------------------------ run
    def _open_tracking(self) -> None:
        """Tracker (fails fast on an unreachable server), parent run, resolved config artifact."""
        from .tracking import Tracker  # imported here: mlflow's import (~1 s) overlaps Ray's boot

        cfg = self.cfg
        self.tracker = Tracker(self.tracking_uri, cfg.name)
        self.parent = self.tracker.start_parent(
            self.out.name, _flatten(cfg.model_dump(mode="json")),
            {"mfsweep.sweep_key": self.sweep_key, "mfsweep.kind": "scaling",
             "mfsweep.git_commit": _git_commit() or "none", "mfsweep.out": str(self.out.resolve()),
             "mfsweep.driver_host": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
             **{f"version.{k}": v for k, v in _versions().items()}})
        self.tracker.log_artifact(self.parent, self.out / "config.yaml")

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        ex = cfg.execution
        self.variants = cfg.variant_configs()
        self._progress: Progress | None = None
        plan_path = self.out / "plan.json"
        todo = [n for n in self.networks if n.net_id not in self.results]
        stop = threading.Event()
        failures: list[JobFailure] = []
        pool: Pool | None = None
        closer: threading.Thread | None = None
        try:
            if todo:
                code = modules_for_workers(v.task for _, v in self.variants)
                pool = open_beside(lambda: make_pool(
                    ex.backend, address=self.address, device=ex.device, workers=ex.workers,
                    cpus_per_worker=ex.cpus_per_worker, max_retries=ex.max_retries, py_modules=code),
                    self._open_tracking)
            else:
                self._open_tracking()
            if self.results and plan_path.exists():
                self._reconcile(load_jobs(plan_path))
            if pool is not None:
                if plan_path.exists():
                    jobs = [j for j in load_jobs(plan_path)
                            if any(sp.net_id not in self.results for sp in j.networks)]
                else:
                    jobs = plan_packs(cfg, self.networks, n_workers=pool.n_workers,
                                      memory_bytes=pool.memory_bytes, checkpoint_dir=self.out / "checkpoints",
                                      skip=set(self.results))
                    save_jobs(jobs, plan_path)
                shipper = DataShipper()  # a dataset's arrays: read once here, to the workers via the object store
                jobs = [shipper.attach(j) for j in jobs]
                self.console.print(
                    f"[bold]{cfg.name}[/]: {len(todo)} networks in {len(jobs)} packs on {pool.n_workers} "
                    f"{pool.device} worker(s); MLflow {self.tracking_uri}", soft_wrap=True)
                # Where the numbers came from: the workers' devices and nodes (timings depend on them).
                self.tracker.set_tags(self.parent, {
                    "mfsweep.workers": f"{pool.n_workers} x {pool.device}",
                    "mfsweep.worker_nodes": str(len({w.node for w in pool.workers})),
                    "mfsweep.worker_device_names": ", ".join(sorted({w.device for w in pool.workers}))})
                total = float(sum(self.by_id[sp.net_id].spec.width * j.dynamics.steps
                                  for j in jobs for sp in j.networks if sp.net_id not in self.results))
                progress = Progress(
                    TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TextColumn("{task.fields[networks]} networks"), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=self.console, disable=not self.show_progress, transient=False)
                with progress, _stop_on_signals(stop):
                    self._progress = progress
                    self._task_id = progress.add_task(
                        "training", total=total, networks=f"{len(self.results)}/{len(self.networks)}")
                    failures = pool.run(jobs, self._on_event, stop)
                    self._progress = None
                closer = close_in_background(pool)  # while the analysis runs
                pool = None
                for f in failures:
                    for sp in f.job.networks:
                        self._record(sp.net_id, NetStatus.FAILED.value, None, self.last_step.get(sp.net_id, 0),
                                     f.reason, 0.0)
                if stop.is_set():
                    self.tracker.flush()
                    raise Interrupted(
                        f"interrupted with {len(self.results)}/{len(self.networks)} networks done; "
                        f"resume with: mfsweep resume {self.out}")
            summary = self._finish()
        finally:
            if pool is not None:
                pool.close()
            if closer is not None:
                closer.join(timeout=60)
            tracker = getattr(self, "tracker", None)
            if tracker is not None:
                try:
                    tracker.close()
                except Exception as err:  # report, but keep the primary error if any
                    self.console.print(f"[red]MLflow: {err}[/]")
        return summary

    # ------------------------------------------------------------------ analysis
    def _finish(self) -> dict[str, Any]:
        per_variant: dict[str, tuple[list[analysis.Point], analysis.Fit | None]] = {}
        out_variants = []
        for name, _ in self.variants:
            pts = [analysis.Point(r.width, r.replicate, r.final_test_loss, r.status)
                   for r in sorted(self.results.values(), key=lambda r: r.net_id) if r.variant == name]
            try:
                fit: analysis.Fit | None = analysis.fit_scaling(pts, seed=self.cfg.sweep.seed)
            except ValueError as err:
                self.console.print(f"[yellow]{name}: no fit ({err})[/]")
                fit = None
            per_variant[name] = (pts, fit)
            out_variants.append({
                "name": name,
                "exponent": fit.exponent if fit else None,
                "exponent_ci95": list(fit.exponent_ci95) if fit else None,
                "prefactor": fit.prefactor if fit else None,
                "r2": fit.r2 if fit else None,
                "points": [{"width": p.width, "seed": p.seed, "test_loss": p.test_loss, "status": p.status}
                           for p in pts],
            })
            if fit is not None:
                self.tracker.log_metrics(self.parent, {
                    f"{name}.exponent": fit.exponent, f"{name}.exponent_ci95_lo": fit.exponent_ci95[0],
                    f"{name}.exponent_ci95_hi": fit.exponent_ci95[1], f"{name}.prefactor": fit.prefactor,
                    f"{name}.r2": fit.r2}, 0)
        summary = {
            "sweep": self.cfg.name,
            "variants": out_variants,
            "mlflow": {"tracking_uri": self.tracking_uri, "experiment_id": self.tracker.experiment_id,
                       "parent_run_id": self.parent},
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
        artifacts = [self.out / "summary.json"]
        if any(f is not None for _, f in per_variant.values()):
            artifacts.append(analysis.plot_scaling(per_variant, self.out / "scaling.png",
                                                   f"{self.cfg.name}: final test loss vs width"))
        curves = self._mean_curves()
        if curves:
            artifacts.append(analysis.plot_curves(curves, self.out / "curves.png",
                                                  f"{self.cfg.name}: test loss (mean over seeds)"))
        self.tracker.flush()
        for path in artifacts:
            self.tracker.log_artifact(self.parent, path)
        self.tracker.end_run(self.parent, "FINISHED")
        self._print_table(per_variant)
        return summary

    def _mean_curves(self) -> dict[str, list[tuple[int, float]]]:
        """Seed-averaged test-loss curve per (variant, width) from this session's reports."""
        acc: dict[str, dict[int, list[float]]] = {}
        for nid, pts in self.curves.items():
            net = self.by_id[nid]
            label = f"{net.variant} n={net.spec.width}"
            for step, val in pts:
                if math.isfinite(val):
                    acc.setdefault(label, {}).setdefault(step, []).append(val)
        return {k: sorted((s, sum(v) / len(v)) for s, v in d.items()) for k, d in acc.items()}

    def _print_table(self, per_variant: dict[str, tuple[list[analysis.Point], analysis.Fit | None]]) -> None:
        """Rows = widths, columns = variants (fits a terminal for any number of widths), then the fits."""
        table = Table(title=f"{self.cfg.name}: final test loss", caption="mean over seeds; fit: loss ~ width^exponent")
        table.add_column("width", justify="right")
        for name in per_variant:
            table.add_column(name, justify="right")
        for w in self.cfg.sweep.widths:
            row = [str(w)]
            for pts, _ in per_variant.values():
                vals = [p.test_loss for p in pts if p.width == w and p.status == "finished"
                        and p.test_loss is not None]
                bad = sum(1 for p in pts if p.width == w and p.status != "finished")
                cell = f"{sum(vals) / len(vals):.3g}" if vals else "-"
                row.append(cell + (f" ({bad} failed)" if bad else ""))
            table.add_row(*row)
        fits = []
        for _, fit in per_variant.values():
            fits.append(f"{fit.exponent:+.2f} [{fit.exponent_ci95[0]:+.2f}, {fit.exponent_ci95[1]:+.2f}]"
                        if fit is not None else "-")
        table.add_section()
        table.add_row("exponent", *fits)
        table.add_row("R²", *[f"{fit.r2:.2f}" if fit is not None else "-" for _, fit in per_variant.values()])
        Console().print(table)
