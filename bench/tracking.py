"""Benchmark: metric points/s through orchestrator.tracking.Tracker into a fresh SQLite MLflow store.

    python bench/tracking.py [--points 200000] [--runs 100] [--metrics 4]

Last line of stdout is one JSON object:
    points, seconds, points_per_s    Tracker (default path), from the first log_metrics call to flush() done
    all_present                      every point read back from MLflow with the right step and value
    enqueue_points_per_s             caller-side rate of log_metrics alone (never waits on the store)
    log_batch_points_per_s           Tracker with fast_sql=False (MlflowClient.log_batch), on a sample
    naive_points_per_s               one MlflowClient.log_metric call per point, on a small sample
    unreachable_fail_s               Tracker() against a port nothing listens on: seconds until it raises
With --outage (starts a real `mlflow server`, then kills it):
    outage_points, outage_log_s      caller-side time of log_metrics for that many points while the server
                                     is dead (the queue takes them; nothing waits for the server)
    give_up_retry_max_s, give_up_s   flush() with the server dead, from its call until it raises "not written"
                                     (the Tracker stops retrying after retry_max_s)
With --postgres (a throwaway PostgreSQL server, tests/conftest.py's pg_cluster, reached directly: the COPY path):
    the same Tracker run once per --shards value (how many connections write metric points at once,
    orchestrator.tracking.sqlstore.PG_POINT_SHARDS) and --copy format (binary or text COPY of the points,
    sqlstore.PG_BINARY_COPY; binary needs --driver psycopg, psycopg 3), --repeat times, alternating, in one
    process, each into its own experiment: pg_points_per_s {"shards/format[#round]": points/s}, pg_all_present
    {...: every point read back}; the SQLite figures above are then skipped.
These timings were asserts in tests/orchestrator/test_tracking.py; they are figures here, the tests keep the
behaviour. MLflow is imported here only to read back and for the naive baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from orchestrator.tracking import Tracker, TrackingError, sqlstore


def value(run: int, metric: int, step: int) -> float:
    return run * 1e6 + metric * 1e5 + step * 0.5


def run_tracker(uri: str, experiment: str, points: int, runs: int, metrics: int,
                **kwargs: object) -> tuple[dict[str, float], list[str], int]:
    """Log ``points`` points; returns timings, the child run ids and the number of steps per run."""
    steps = max(1, points // (runs * metrics))
    keys = [f"m{j}" for j in range(metrics)]
    tr = Tracker(uri, experiment, **kwargs)  # type: ignore[arg-type]
    parent = tr.start_parent(experiment, {"runs": runs}, {"mfsweep.sweep_key": experiment})
    t0 = time.perf_counter()
    kids = [tr.start_child(parent, f"net{i}", f"net{i}", {"i": i}, {}) for i in range(runs)]
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(steps):
        for i, kid in enumerate(kids):
            tr.log_metrics(kid, {k: value(i, j, step) for j, k in enumerate(keys)}, step)
    t_enqueue = time.perf_counter() - t0
    tr.flush()
    t_total = time.perf_counter() - t0
    for kid in kids:
        tr.end_run(kid)
    tr.end_run(parent)
    tr.close()
    n = steps * runs * metrics
    assert tr.stats.points_logged == n + 0, tr.stats
    return {"seconds": t_total, "enqueue_s": t_enqueue, "setup_s": t_setup, "points": n}, kids, steps


def all_present(uri: str, kids: list[str], steps: int, metrics: int) -> bool:
    client = MlflowClient(uri)
    for i, kid in enumerate(kids):
        for j in range(metrics):
            hist = client.get_metric_history(kid, f"m{j}")
            if sorted((m.step, m.value) for m in hist) != [(s, value(i, j, s)) for s in range(steps)]:
                return False
    return True


def naive_rate(uri: str, n: int) -> float:
    client = MlflowClient(uri)
    exp = client.create_experiment("naive")
    run = client.create_run(exp).info.run_id
    t0 = time.perf_counter()
    for step in range(n):
        client.log_metric(run, "m", float(step), step=step)
    return n / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unreachable_fail_s() -> float:
    t0 = time.perf_counter()
    try:
        Tracker(f"http://127.0.0.1:{free_port()}", "nowhere")
    except TrackingError:
        return time.perf_counter() - t0
    raise RuntimeError("a Tracker to a port nothing listens on did not raise")


def start_server(root: Path, timeout: float = 180.0) -> tuple[subprocess.Popen[bytes], str]:
    """A real `mlflow server` on SQLite in its own process group; returns it once /health answers."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as resp:
                if resp.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"mlflow server did not come up in {timeout}s")


def outage(root: Path, points: int, retry_max_s: float) -> dict[str, float]:
    """Kill the server under a Tracker: how long logging takes for the caller, and when flush gives up."""
    proc, uri = start_server(root)
    try:
        tr = Tracker(uri, "outage", flush_interval_s=0.05, retry_max_s=retry_max_s)
        parent = tr.start_parent("outage", {}, {"mfsweep.sweep_key": "outage"})
        tr.log_metrics(parent, {"m": 0.0}, 0)
        tr.flush(timeout=60)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.perf_counter()
        for step in range(1, points + 1):
            tr.log_metrics(parent, {"m": float(step)}, step)
        log_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            tr.flush(timeout=600)
            raise RuntimeError("flush succeeded with the server dead")
        except TrackingError as err:
            if "not written" not in str(err):
                raise
        give_up_s = time.perf_counter() - t0
        with contextlib.suppress(TrackingError):  # it gave up: close reports the loss again
            tr.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return {"outage_points": points, "outage_log_s": round(log_s, 4), "give_up_retry_max_s": retry_max_s,
            "give_up_s": round(give_up_s, 3)}


def postgres(points: int, runs: int, metrics: int, shards: list[int], formats: list[str], repeat: int,
             driver: str) -> dict[str, object]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale import postgres_uri

    rates: dict[str, int] = {}
    present: dict[str, bool] = {}
    with postgres_uri(driver) as uri:
        rounds = [(r, k, f) for r in range(repeat) for k in shards for f in formats]  # alternating, side by side
        for i, (r, k, fmt) in enumerate(rounds):
            sqlstore.PG_POINT_SHARDS = k
            sqlstore.PG_BINARY_COPY = fmt == "binary"
            c0 = time.process_time()
            t, kids, steps = run_tracker(uri, f"bench-{i}-shards{k}-{fmt}", points, runs, metrics)
            print(f"client CPU {time.process_time() - c0:.1f}s over {t['seconds']:.1f}s", file=sys.stderr)
            name = f"{k}/{fmt}" + (f"#{r + 1}" if repeat > 1 else "")
            rates[name] = round(t["points"] / t["seconds"])
            present[name] = all_present(uri, kids, steps, metrics)
            print(f"{name}: {rates[name]} points/s, all present: {present[name]}", file=sys.stderr)
    return {"points": points, "runs": runs, "metrics": metrics, "driver": driver, "pg_points_per_s": rates,
            "pg_all_present": present}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--metrics", type=int, default=4)
    ap.add_argument("--log-batch-points", type=int, default=40_000, help="sample for the log_batch path")
    ap.add_argument("--naive-points", type=int, default=500, help="sample for the naive baseline")
    ap.add_argument("--dir", type=Path, default=None, help="store folder (default: a temporary one)")
    ap.add_argument("--outage", action="store_true", help="also time logging and giving up with the server dead")
    ap.add_argument("--outage-points", type=int, default=10_500)
    ap.add_argument("--retry-max-s", type=float, default=1.5, help="the Tracker's retry_max_s in the outage")
    ap.add_argument("--postgres", action="store_true", help="into PostgreSQL instead, per --shards value")
    ap.add_argument("--shards", default="1,2,4", help="with --postgres: the point-writing connections to compare")
    ap.add_argument("--driver", choices=["psycopg", "psycopg2"], default="psycopg",
                    help="with --postgres: psycopg 3 (as deploy/ uses) or psycopg2 (text COPY only)")
    ap.add_argument("--copy", default="binary", help="with --postgres: COPY formats to compare, e.g. binary,text")
    ap.add_argument("--repeat", type=int, default=1, help="with --postgres: rounds of every shards x format")
    args = ap.parse_args()
    if args.postgres:
        print(json.dumps(postgres(args.points, args.runs, args.metrics, [int(k) for k in args.shards.split(",")],
                                  args.copy.split(","), args.repeat, args.driver)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{root / 'bench_mlflow.db'}"
        main_t, kids, steps = run_tracker(uri, "bench", args.points, args.runs, args.metrics)
        present = all_present(uri, kids, steps, args.metrics)
        batch_t, _, _ = run_tracker(uri, "bench-log_batch", args.log_batch_points, args.runs, args.metrics,
                                    fast_sql=False)
        naive = naive_rate(uri, args.naive_points)
        down = outage(root, args.outage_points, args.retry_max_s) if args.outage else {}
    result = {
        "points": main_t["points"],
        "seconds": round(main_t["seconds"], 3),
        "points_per_s": round(main_t["points"] / main_t["seconds"]),
        "all_present": present,
        "runs": args.runs,
        "enqueue_points_per_s": round(main_t["points"] / main_t["enqueue_s"]),
        "start_child_s": round(main_t["setup_s"], 3),
        "log_batch_points": batch_t["points"],
        "log_batch_points_per_s": round(batch_t["points"] / batch_t["seconds"]),
        "naive_points": args.naive_points,
        "naive_points_per_s": round(naive, 1),
        "unreachable_fail_s": round(unreachable_fail_s(), 3),
        **down,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
