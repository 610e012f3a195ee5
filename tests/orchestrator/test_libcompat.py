"""What orchestrator/libcompat.py relies on in Ray and MLflow beyond their documented API: each test fails with
a message naming the entry to revisit when a library changes it."""

from __future__ import annotations

import inspect
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import libcompat

ROOT = Path(__file__).resolve().parents[2]


def test_local_ray_workers_run_at_the_drivers_priority_without_auth_warning() -> None:
    """Ray's default runs workers at nice 15; a pool that starts Ray runs them at the driver's niceness, with
    no start-up warning about token authentication."""
    import ray

    from orchestrator.pool import RayPool

    if ray.is_initialized():
        pytest.skip("Ray already running in this process")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    handler = Keep(logging.WARNING)
    logging.getLogger("ray").addHandler(handler)
    pool = RayPool(workers=1, max_retries=0)
    try:
        assert pool.local
        worker_nice = ray.get(ray.remote(lambda: os.nice(0)).options(num_cpus=0).remote())
        assert worker_nice == os.nice(0), (
            f"Ray workers run at nice {worker_nice}, not the driver's {os.nice(0)}: Ray no longer honours "
            f"{libcompat.RAY_WORKER_NICENESS_ENV} (libcompat.local_ray_env)")
        assert libcompat.RAY_WORKER_NICENESS_ENV not in os.environ  # only the processes Ray started have it
    finally:
        pool.close()
        logging.getLogger("ray").removeHandler(handler)
    auth_warnings = [r for r in seen if "authentication" in r.getMessage().lower()]
    assert not auth_warnings, (f"Ray's start-up notice is no longer logged by {libcompat.RAY_AUTH_LOGGER}: "
                               f"{auth_warnings[0].getMessage()}")


def test_mlflow_rest_helpers_exist_with_the_signatures_used() -> None:
    from mlflow.utils import rest_utils

    for name in ("http_request", "verify_rest_response"):
        assert hasattr(rest_utils, name), f"mlflow.utils.rest_utils.{name} is gone: update libcompat.mlflow_request"
    params = inspect.signature(rest_utils.http_request).parameters
    missing = {"host_creds", "endpoint", "method", "max_retries", "timeout"} - set(params)
    assert not missing, f"mlflow's http_request lost {missing}: update libcompat.mlflow_request"
    assert any(p.kind is p.VAR_KEYWORD for p in params.values()), "http_request no longer forwards json="


def test_mlflow_rest_bodies_follow_the_documented_format() -> None:
    from mlflow.entities import Metric, Param, RunTag

    body = libcompat.log_batch_body("r1", [Metric("loss", math.nan, 5, 3), Metric("acc", 0.5, 6, 4)],
                                    [Param("lr", "0.1")], [RunTag("t", "v")])
    assert body["run_id"] == "r1"
    assert body["params"] == [{"key": "lr", "value": "0.1"}] and body["tags"] == [{"key": "t", "value": "v"}]
    loss, acc = body["metrics"]
    assert loss["key"] == "loss" and loss["value"] == "NaN" and int(loss["step"]) == 3
    assert int(acc["timestamp"]) == 6 and acc["value"] == 0.5
    end = libcompat.update_run_body("r1", "FINISHED", 123)
    assert end["run_id"] == "r1" and end["status"] == "FINISHED" and int(end["end_time"]) == 123
    with pytest.raises(ValueError):
        libcompat.update_run_body("r1", "NOT_A_STATUS", 1)


BLOCKED = """
import sys
import mlflow.utils.rest_utils, mlflow.utils.validation
del mlflow.utils.rest_utils.http_request  # as if MLflow renamed its internals
del mlflow.utils.validation._validate_metric_name
from orchestrator.tracking import Tracker, TrackingError
with Tracker(sys.argv[1], "e") as tr:
    run = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
    tr.log_metrics(run, {"loss": 1.0}, 0)
try:
    Tracker("http://127.0.0.1:9", "e")
except TrackingError as err:
    print("http:", err)
"""


def test_tracking_does_not_depend_on_mlflows_internals_at_import(tmp_path: Path) -> None:
    """Without MLflow's internal helpers, a SQLite store still works and an HTTP one fails with one line
    naming the missing piece and the supported MLflow range."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", BLOCKED, uri], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()[-1]
    assert out.startswith("http: MLflow's REST helpers are gone") and libcompat.MLFLOW_SUPPORTED in out, out
