"""Scale simulation of the driver's MLflow side: fake workers emit reports, the real Tracker stores them.

    python bench/scale.py [--networks 1000] [--workers 10] [--reports 20] [--interval-s 0]
                          [--postgres] [--uri URI]

No training and no Ray: ``--workers`` threads each own one pack of ``networks / workers`` networks and emit
``--reports`` reports (one curve point of 3 metrics per network each, ``--interval-s`` apart), then retire
the pack's networks. The main thread is the driver: it consumes the events in arrival order and makes the
calls ``orchestrator/scaling.py`` makes for them (``start_child`` with the same params and tags at a
network's first point, ``log_metrics`` per point, then per retired network a fsynced results.jsonl line,
final metrics, tags and ``end_run``), then the parent's end, ``flush`` and ``close``. It drives the Tracker
the way scaling does rather than scaling itself (ScalingSweep builds its pool from the config: there is no
seam to inject a fake one without editing scaling.py).

Last line of stdout is one JSON object:
    networks, workers, points            sizes (points: curve + final metric points)
    driver_s_per_network                 main-thread time spent in the driver calls above, per network
                                         (the report path; the writer thread's time is not in it)
    fsync_s_per_network                  the part of it spent in fsync of results.jsonl
    wall_s, wall_s_per_network           first event to close() returned (everything stored)
    points_per_s                         points / wall_s (sustained into the store, writer included)
    peak_rss_mb                          peak resident memory of the whole process (driver + fake workers)
    readback_runs, readback_unique       child runs MLflow lists under the parent, and distinct keys among them
    readback_*                           what MLflow gives back: child runs and distinct keys, latest_metrics of
                                         every run, full histories of --sample-runs runs; readback_ok: every
                                         sampled history complete and once, every run FINISHED with the last
                                         curve value as its latest test_loss
With --postgres the store is a throwaway PostgreSQL database (tests/conftest.py's pg_cluster) reached directly,
with --server a real `mlflow server` on one (tests/deploy/test_services.py's MlflowServer);
``--uri`` takes any tracking URI (e.g. an ``http://`` mlflow server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ("test_loss", "train_loss", "grad_norm")


def curve(net: int, step: int) -> float:
    return 1.0 / (1 + step) + net * 1e-6


def fake_worker(w: int, nets: list[int], reports: int, interval_s: float, out: queue.Queue[Any]) -> None:
    """One worker, one pack: ``reports`` reports of every network's point, then the pack's retirements."""
    for r in range(reports):
        step = (r + 1) * 10
        out.put(("report", w, step, nets))
        if interval_s:
            time.sleep(interval_s)
    out.put(("retired", w, reports * 10, nets))
    out.put(("done", w, 0, []))


def drive(uri: str, networks: int, workers: int, reports: int, interval_s: float, out_dir: Path,
          sample: int = 50) -> dict[str, Any]:
    from orchestrator.tracking import Tracker

    exp = f"scale-{networks}-{workers}-{int(time.time())}"
    tr = Tracker(uri, exp)
    parent = tr.start_parent(exp, {"networks": networks}, {"mfsweep.sweep_key": exp})
    events: queue.Queue[Any] = queue.Queue()
    shares = [list(range(w, networks, workers)) for w in range(workers)]
    threads = [threading.Thread(target=fake_worker, args=(w, shares[w], reports, interval_s, events), daemon=True)
               for w in range(workers)]
    child: dict[int, str] = {}
    results = (out_dir / "results.jsonl").open("a")
    driver_s = fsync_s = 0.0
    points = 0
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    live = workers
    while live:
        kind, _w, step, nets = events.get()
        a = time.perf_counter()
        if kind == "done":
            live -= 1
        elif kind == "report":
            for n in nets:
                run = child.get(n)
                if run is None:  # what ScalingSweep._child does at a network's first point
                    params = {"variant": "relu", "width": 16 * (1 + n % 8), "replicate": n // 8, "net_id": n,
                              "unit": "relu", "parametrization": "mf", "algorithm": "sgd", "lr": 0.1,
                              "batch_size": 64, "temperature": 0.0, "bd_rate": 0.0, "bd_scheme": "none",
                              "task": "teacher", "dim": 8}
                    run = child[n] = tr.start_child(parent, f"net-{n}", f"relu w={params['width']} r={n // 8}",
                                                    params, {"mfsweep.key": f"net-{n}", "mfsweep.variant": "relu",
                                                             "mfsweep.steps": str(reports * 10)})
                tr.log_metrics(run, {"test_loss": curve(n, step), "train_loss": curve(n, step) * 0.9,
                                     "grad_norm": 0.5}, step)
                points += 3
        else:  # retired: ScalingSweep._write + _finalize_run
            for n in nets:
                results.write(json.dumps({"net_id": n, "status": "finished", "step": step}) + "\n")
                results.flush()
                f0 = time.perf_counter()
                os.fsync(results.fileno())
                fsync_s += time.perf_counter() - f0
                run = child[n]
                tr.log_metrics(run, {"wall_time_s": 1.0, "final_step": float(step), "stop_step": float(step),
                                     "final_test_loss": curve(n, step)}, step)
                points += 4
                tr.set_tags(run, {"mfsweep.status": "finished", "mfsweep.reason": "cap", "mfsweep.converged": "false"})
                tr.end_run(run, "FINISHED")
        driver_s += time.perf_counter() - a
    a = time.perf_counter()
    tr.end_run(parent, "FINISHED")
    tr.close()
    wall = time.perf_counter() - t0
    close_s = time.perf_counter() - a
    results.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {"networks": networks, "workers": workers, "reports": reports, "points": points,
            "driver_s_per_network": round(driver_s / networks, 6), "driver_s": round(driver_s, 3),
            "fsync_s_per_network": round(fsync_s / networks, 6),
            "close_s": round(close_s, 3), "wall_s": round(wall, 3), "wall_s_per_network": round(wall / networks, 6),
            "points_per_s": round(points / wall), "peak_rss_mb": round(rss_mb, 1),
            "uri": uri.split("@")[-1]}
    print(json.dumps(res), file=sys.stderr, flush=True)  # before the read-back, which is slow at 100k
    ids = {n: tr.run_id(r) for n, r in child.items()}  # a server's new runs: handles until created
    return {**res, **readback(uri, tr.experiment_id, parent, ids, reports, sample)}


def readback(uri: str, experiment_id: str, parent: str, child: dict[int, str], reports: int,
             sample_size: int) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    keys = [r.data.tags.get("mfsweep.key") for r in runs]
    by_id = {r.info.run_id: r for r in runs}
    ok = len(runs) == len(child) == len(set(keys)) and set(by_id) == set(child.values())
    last = reports * 10
    latest = 0
    for n, rid in child.items():
        r = by_id.get(rid)
        if r is None or r.info.status != "FINISHED" or r.data.metrics.get("test_loss") != curve(n, last):
            ok = False
        else:
            latest += len(r.data.metrics)
    sample = random.Random(0).sample(sorted(child), min(sample_size, len(child)))
    hist_points = 0
    for n in sample:
        for m in METRICS:
            steps = [x.step for x in client.get_metric_history(child[n], m)]
            hist_points += len(steps)
            if sorted(steps) != [10 * (r + 1) for r in range(reports)]:
                ok = False
    return {"readback_runs": len(runs), "readback_unique": len(set(keys)), "readback_latest_metrics": latest,
            "readback_sampled_runs": len(sample), "readback_sampled_points": hist_points, "readback_ok": ok}


@contextlib.contextmanager
def postgres_uri() -> Iterator[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import psycopg2

    from tests.conftest import pg_cluster

    with pg_cluster() as base:
        conn = psycopg2.connect(f"{base}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute('CREATE DATABASE "scale"')
        conn.close()
        yield f"{base}/scale".replace("postgresql://", "postgresql+psycopg2://", 1)


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
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--reports", type=int, default=20, help="curve points per network")
    ap.add_argument("--interval-s", type=float, default=0.0, help="seconds between a worker's reports")
    ap.add_argument("--sample-runs", type=int, default=50, help="runs whose full histories are read back")
    ap.add_argument("--postgres", action="store_true", help="a throwaway PostgreSQL store")
    ap.add_argument("--server", action="store_true", help="a real `mlflow server` on a throwaway PostgreSQL")
    ap.add_argument("--uri", help="any tracking URI (default: a fresh SQLite store)")
    args = ap.parse_args()
    if args.networks < args.workers or args.workers < 1 or args.reports < 1:
        ap.error("need networks >= workers >= 1 and reports >= 1")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="mfsweep-scale-") as tmp:
        out = Path(tmp)
        with contextlib.ExitStack() as stack:
            if args.uri:
                uri = args.uri
            elif args.server:
                uri = stack.enter_context(server_uri(out))
            elif args.postgres:
                uri = stack.enter_context(postgres_uri())
            else:
                uri = f"sqlite:///{out / 'mlflow.db'}"
            res = drive(uri, args.networks, args.workers, args.reports, args.interval_s, out, args.sample_runs)
    res["uptime"] = load
    print(json.dumps(res))


if __name__ == "__main__":
    main()
