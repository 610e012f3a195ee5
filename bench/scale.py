"""Scale simulation: the real `mfsweep scaling` driver on a simulated pool (fake workers, no training).

    python bench/scale.py [--networks 1000] [--workers 10] [--reports 20] [--interval-s 0]
                          [--runs network|group] [--pack-size K] [--postgres | --server | --uri URI]
                          [--sample-runs 50]

It runs ``orchestrator.scaling.ScalingSweep`` (what ``mfsweep scaling`` runs: plan, ledger, tracker,
results.jsonl, analysis, summary.json, plots) with its pool made by ``orchestrator.simpool.SimPool``:
``--workers`` fake worker threads that emit, for each pack, the reports a real pack emits (every network's
test_loss at step 0 and every 10 steps to ``10 * --reports``, train_loss from step 10 on, each network's end
with the engine's final-window estimate), ``--interval-s`` apart per worker, from the planted curve
L = 2 / n * f * (1 + 1 / (1 + t)) (f: 5% lognormal per network). The sweep: one variant, widths 8..4096
(10 widths), ``--networks / 10`` seeds, teacher task (its specs only: nothing trains).

Last line of stdout is one JSON object:
    networks, workers, packs, pack_size, reports,  sizes (runs: tracking.runs, the MLflow layout; pack_size:
    runs                                           execution.max_networks_per_pack: at most workers x pack_size
                                                   networks are in flight, so memory held per network shows
                                                   apart from memory held per network in flight)
    points                                         curve points (test_loss + train_loss values) the sweep logged
    driver_cpu_s_per_network                       the driver's CPU time per network, whole sweep (plan to summary,
                                                   plots and tracker close): process CPU time minus the fake
                                                   workers' threads' (time.thread_time); the tracker's writer thread
                                                   and the SQLite/PostgreSQL client work are the driver's
    run_cpu_s_per_network                          the same over pool.run only (the report path: ledger, tracker,
                                                   results.jsonl fsyncs; the tracker's writer may finish later)
    wall_s, run_wall_s                             whole sweep; pool.run (first pack handed out to the last end)
    points_per_s                                   points / run_wall_s: taken in by the ledger and handed to the
                                                   tracker (whose writer thread may still be storing them after)
    points_per_s_end_to_end                        points / wall_s: all of them stored, plus planning and analysis
    worker_cpu_s                                   the fake workers' CPU time (not the driver's)
    rss_base_mb, peak_rss_mb, rss_growth_mb        resident memory after the imports, the process's peak (driver
                                                   and fake workers; the workers hold a bounded queue of reports),
                                                   and the difference
    run_peak_rss_mb                                the peak by the end of pool.run (planning and the report path;
                                                   the rest of the peak is the analysis, plots and read-back)
    exponent, exponent_ci95, planted_exponent,     summary.json's fitted exponent of the variant and whether its
    exponent_ok                                    95% interval holds the planted one
    results_ok                                     results.jsonl holds every network once
    readback_*                                     what MLflow gives back: child runs under the parent and distinct
                                                   keys among them, every network's latest test_loss equal to the
                                                   planted value at the cap and its run FINISHED, the full
                                                   test_loss/train_loss histories of --sample-runs networks
                                                   (every step once, the planted values); readback_ok: all of it
    uptime                                         machine load when the run started
With --postgres the store is a throwaway PostgreSQL database (tests/conftest.py's pg_cluster) reached directly,
with --server a real `mlflow server` on one (tests/deploy/test_services.py's MlflowServer);
``--uri`` takes any tracking URI (e.g. an ``http://`` mlflow server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator import config as cfgmod
from orchestrator.config import ExecutionConfig
from orchestrator.credentials import redact
from orchestrator.pool import JobFailure, OnDone, OnIdle, OnWait
from orchestrator.scaling import ScalingSweep
from orchestrator.simpool import PlantedCurve, SimPool
from workers.jobs import PackEvent, PackJob

WIDTHS = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
EVAL_EVERY = 10


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class TimedSimPool(SimPool):
    """A SimPool that times its run (wall and process CPU time)."""

    run_wall_s = 0.0
    run_cpu_s = 0.0
    n_packs = 0
    run_peak_rss_mb = 0.0

    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None], stop: Any = None,
            on_done: OnDone | None = None, on_idle: OnIdle | None = None,
            on_wait: OnWait | None = None) -> list[JobFailure]:
        self.n_packs += len(jobs)
        w0, c0 = time.perf_counter(), cpu_s()
        try:
            return super().run(jobs, on_event, stop, on_done, on_idle, on_wait)
        finally:
            self.run_wall_s += time.perf_counter() - w0
            self.run_cpu_s += cpu_s() - c0
            self.run_peak_rss_mb = peak_rss_mb()  # the process's peak so far: planning and the report path


def sweep_config(networks: int, reports: int, runs: str, pack_size: int | None = None) -> cfgmod.ScalingConfig:
    steps = reports * EVAL_EVERY
    packing = [] if pack_size is None else [f"execution.max_networks_per_pack={pack_size}"]
    return cfgmod.load(None, [*packing,
        "name=scale", "task.kind=teacher", "task.dim=4", "sweep.variants=[]", f"sweep.widths={WIDTHS}",
        f"sweep.seeds={networks // len(WIDTHS)}", f"dynamics.steps={steps}", f"dynamics.eval_every={EVAL_EVERY}",
        # The final window: the last half of the run (>= 10 reports for the plateau test from 20 reports on).
        f"dynamics.stop.window={steps // 2}", "execution.backend=local", f"tracking.runs={runs}"])


def drive(uri: str, out: Path, networks: int, workers: int, reports: int, interval_s: float, runs: str,
          sample: int, pack_size: int | None = None) -> dict[str, Any]:
    cfg = sweep_config(networks, reports, runs, pack_size)
    curve = PlantedCurve()
    pools: list[TimedSimPool] = []

    def make(ex: ExecutionConfig, address: str | None, py_modules: Sequence[str]) -> SimPool:
        pools.append(TimedSimPool(workers, curve=curve, interval_s=interval_s))
        return pools[-1]

    base = rss_mb()
    w0, c0 = time.perf_counter(), cpu_s()
    sweep = ScalingSweep(cfg, out, tracking_uri=uri, progress=False, pool_factory=make)
    with contextlib.redirect_stdout(sys.stderr):  # the sweep's table: stdout ends with the JSON line
        summary = sweep.run()
    wall, cpu = time.perf_counter() - w0, cpu_s() - c0
    (pool,) = pools
    worker_cpu = pool.worker_cpu_s
    n = len(sweep.networks)
    points = n * (2 * reports + 1)
    (v,) = summary["variants"]
    lo, hi = v["exponent_ci95"] or (float("nan"), float("nan"))
    res: dict[str, Any] = {
        "networks": n, "workers": workers, "packs": pool.n_packs, "pack_size": cfg.execution.max_networks_per_pack,
        "reports": reports, "runs": runs,
        "interval_s": interval_s, "points": points,
        "driver_cpu_s_per_network": round((cpu - worker_cpu) / n, 6), "driver_cpu_s": round(cpu - worker_cpu, 2),
        "run_cpu_s_per_network": round((pool.run_cpu_s - worker_cpu) / n, 6),
        "wall_s": round(wall, 2), "run_wall_s": round(pool.run_wall_s, 2),
        "points_per_s": round(points / pool.run_wall_s), "points_per_s_end_to_end": round(points / wall),
        "worker_cpu_s": round(worker_cpu, 2),
        "rss_base_mb": round(base, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "run_peak_rss_mb": round(pool.run_peak_rss_mb, 1),
        "exponent": v["exponent"], "exponent_ci95": [lo, hi], "planted_exponent": curve.exponent,
        "exponent_ok": bool(lo <= curve.exponent <= hi), "n_converged": v["n_converged"],
        "results_ok": results_ok(out / "results.jsonl", {net.net_id for net in sweep.networks}),
        "uri": redact(uri),
    }
    res["rss_growth_mb"] = round(res["peak_rss_mb"] - base, 1)
    print(json.dumps(res), file=sys.stderr, flush=True)  # before the read-back, which is slow at 100k
    t = time.perf_counter()
    res.update(readback(uri, summary, sweep, curve, sample))
    res["readback_s"] = round(time.perf_counter() - t, 1)
    return res


def results_ok(path: Path, ids: set[int]) -> bool:
    count = Counter(json.loads(line)["net_id"] for line in path.read_text().splitlines())
    return set(count) == ids and set(count.values()) == {1}


def readback(uri: str, summary: dict[str, Any], sweep: ScalingSweep, curve: PlantedCurve,
             sample_size: int) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = summary["mlflow"]["parent_run_id"]
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([summary["mlflow"]["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    group = sweep.cfg.tracking.runs == "group"

    def run_key(key: str) -> str:
        return key.rsplit("/", 1)[0] if group else key

    def prefix(replicate: int) -> str:
        return f"seed{replicate}/" if group else ""

    keys = [r.data.tags.get("mfsweep.key") for r in runs]
    by_key = {r.data.tags.get("mfsweep.key"): r for r in runs}
    want = {run_key(net.key) for net in sweep.networks}
    ok = len(runs) == len(set(keys)) == len(want) and set(keys) == want
    cap = sweep.cfg.dynamics.steps
    latest_ok = 0
    for net in sweep.networks:
        r = by_key.get(run_key(net.key))
        value = curve.loss(net.spec.width, curve.factor(net.net_id), cap)
        latest = None if r is None else r.data.metrics.get(f"{prefix(net.replicate)}test_loss")
        if r is not None and r.info.status == "FINISHED" and latest == value:
            latest_ok += 1
    ok = ok and latest_ok == len(sweep.networks)
    sample = random.Random(0).sample(sweep.networks, min(sample_size, len(sweep.networks)))
    hist_points = 0
    for net in sample:
        r = by_key.get(run_key(net.key))
        if r is None:
            ok = False
            continue
        f = curve.factor(net.net_id)
        for metric, first, scale in (("test_loss", 0, 1.0), ("train_loss", EVAL_EVERY, 0.98)):
            hist = client.get_metric_history(r.info.run_id, f"{prefix(net.replicate)}{metric}")
            hist_points += len(hist)
            got = sorted((m.step, m.value) for m in hist)
            steps = list(range(first, cap + 1, EVAL_EVERY))
            if got != [(s, scale * curve.loss(net.spec.width, f, s)) for s in steps]:
                ok = False
    return {"readback_runs": len(runs), "readback_unique": len(set(keys)), "readback_latest_ok": latest_ok,
            "readback_sampled_networks": len(sample), "readback_sampled_points": hist_points, "readback_ok": ok}


@contextlib.contextmanager
def postgres_uri(driver: str = "psycopg") -> Iterator[str]:
    """A throwaway PostgreSQL server's database, through ``driver`` (psycopg: psycopg 3, as deploy/ uses)."""
    import psycopg2

    from tests.conftest import pg_cluster

    with pg_cluster() as base:
        conn = psycopg2.connect(f"{base}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute('CREATE DATABASE "scale"')
        conn.close()
        yield f"{base}/scale".replace("postgresql://", f"postgresql+{driver}://", 1)


@contextlib.contextmanager
def server_uri(root: Path) -> Iterator[str]:
    """A real `mlflow server` on a throwaway PostgreSQL (tests/deploy/test_services.py's helpers)."""
    from tests.deploy.test_services import MlflowServer, psycopg_url

    with postgres_uri() as db:
        server = MlflowServer(psycopg_url(db.replace("postgresql+psycopg2://", "postgresql://", 1)),
                              root / "artifacts", root / "server.log")
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--networks", type=int, default=1000, help=f"a multiple of {len(WIDTHS)} (the widths)")
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--reports", type=int, default=20, help="reports per network after step 0 (>= 20)")
    ap.add_argument("--interval-s", type=float, default=0.0, help="seconds between a worker's reports")
    ap.add_argument("--runs", choices=["network", "group"], default="network", help="tracking.runs")
    ap.add_argument("--pack-size", type=int, help="execution.max_networks_per_pack (default: the config's); the "
                    "networks in flight are at most workers x pack size")
    ap.add_argument("--sample-runs", type=int, default=50, help="networks whose full histories are read back")
    ap.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL store")
    ap.add_argument("--server", action="store_true", help="a real `mlflow server` on a throwaway PostgreSQL")
    ap.add_argument("--uri", help="any tracking URI (default: a fresh SQLite store)")
    args = ap.parse_args()
    if args.networks % len(WIDTHS) or args.networks < len(WIDTHS) or args.workers < 1 or args.reports < 20:
        ap.error(f"need networks a positive multiple of {len(WIDTHS)}, workers >= 1 and reports >= 20")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    # What the sweep imports on its way (torch, MLflow, SQLAlchemy, matplotlib): in the base RSS, not the growth.
    import matplotlib.figure  # noqa: F401
    import mlflow  # noqa: F401

    import orchestrator.tracking  # noqa: F401
    from workers.engine import Report  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="mfsweep-scale-") as tmp:
        root = Path(tmp)
        with contextlib.ExitStack() as stack:
            if args.uri:
                uri = args.uri
            elif args.server:
                uri = stack.enter_context(server_uri(root))
            elif args.postgres:
                uri = stack.enter_context(postgres_uri())
            else:
                uri = f"sqlite:///{root / 'mlflow.db'}"
            res = drive(uri, root / "out", args.networks, args.workers, args.reports, args.interval_s, args.runs,
                        args.sample_runs, args.pack_size)
    res["uptime"] = load
    print(json.dumps(res))


if __name__ == "__main__":
    main()
