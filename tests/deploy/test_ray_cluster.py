"""A Ray cluster of a head and two worker nodes on this machine (real GCS, raylets and dashboard processes),
with Ray token authentication on: a sweep is submitted through the Jobs API, one worker node is killed
mid-sweep, and every network's result still arrives exactly once."""

from __future__ import annotations

import json
import secrets
import shlex
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

from .support import MFSWEEP, ROOT

STEPS, EVERY = 1200, 50
CONFIG = ROOT / "configs" / "scaling" / "teacher_relu.yaml"
SETS = ["sweep.widths=[8,16,32,64]", "sweep.seeds=2", "sweep.variants=[]", f"dynamics.steps={STEPS}",
        f"dynamics.eval_every={EVERY}", "dynamics.batch_size=64", "task.n_test=256",
        "execution.checkpoint_every=100", "execution.max_networks_per_pack=2"]
N_NETWORKS = 8


def _reload_ray_auth() -> None:
    # RayConfig and the token loader cache RAY_AUTH_MODE / the token per process; re-read the environment.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def ray_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Token auth for this test's cluster only: a fresh random token in the environment, which the node
    processes inherit and the job client sends. Restored (and the caches re-read) afterwards."""
    token = secrets.token_hex(24)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    _reload_ray_auth()
    yield token
    monkeypatch.undo()
    _reload_ray_auth()


def _status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


@pytest.mark.slow
def test_sweep_via_jobs_api_survives_a_worker_node_loss(ray_token: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from ray.cluster_utils import Cluster
    from ray.job_submission import JobStatus, JobSubmissionClient

    dash_port = free_port()
    # The head takes no actors (num_cpus=0): the two training actors land on the worker nodes, one each.
    # Free ports throughout: Ray's fixed defaults (8265, 52365) may belong to another Ray on this machine.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": dash_port,
        "dashboard_agent_listen_port": free_port()})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        base = f"http://127.0.0.1:{dash_port}"
        deadline = time.monotonic() + 120  # the dashboard's job module comes up after the head
        while _status(f"{base}/api/jobs/", ray_token) != 200:
            assert time.monotonic() < deadline, "Ray Jobs API did not come up"
            time.sleep(0.5)
        # Token auth is really on: no token, or a wrong one, is refused.
        assert _status(f"{base}/api/jobs/", None) == 401
        assert _status(f"{base}/api/jobs/", "not-the-token") == 403

        client = JobSubmissionClient(base)  # sends RAY_AUTH_TOKEN from the environment
        out = tmp_path / "sweep"
        # No --address: like a RayJob's driver, it joins the cluster through the job's RAY_ADDRESS.
        cmd = [str(MFSWEEP), "scaling", str(CONFIG), *[x for s in SETS for x in ("--set", s)],
               "--out", str(out), "--no-progress"]
        job_id = client.submit_job(entrypoint=shlex.join(cmd),
                                   runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})

        # Kill one worker node once both actors are mid-pack (each has written a checkpoint).
        deadline = time.monotonic() + 240
        while len(list((out / "checkpoints").glob("*.pt"))) < 2:
            status = client.get_job_status(job_id)
            assert not status.is_terminal(), f"job ended ({status}):\n{client.get_job_logs(job_id)[-3000:]}"
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(0.1)
        results = out / "results.jsonl"
        done_before = len(results.read_text().splitlines()) if results.exists() else 0
        cluster.remove_node(workers[0], allow_graceful=False)
        assert done_before < N_NETWORKS

        deadline = time.monotonic() + 300
        while not (status := client.get_job_status(job_id)).is_terminal():
            assert time.monotonic() < deadline, client.get_job_logs(job_id)[-3000:]
            time.sleep(0.5)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, logs[-4000:]
        assert "worker died" in logs, logs[-4000:]  # the kill hit a running pack, which was retried
        assert not workers[0].any_processes_alive()
    finally:
        cluster.shutdown()

    ids = [json.loads(line)["net_id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(ids) == list(range(N_NETWORKS)), ids  # every network once, none twice
    summary = json.loads((out / "summary.json").read_text())
    points = [p for v in summary["variants"] for p in v["points"]]
    assert len(points) == N_NETWORKS and all(p["status"] == "finished" for p in points), points

    tracking = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    parent = summary["mlflow"]["parent_run_id"]
    children = tracking.search_runs([summary["mlflow"]["experiment_id"]],
                                    filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    assert len(children) == N_NETWORKS
    for run in children:
        steps = [m.step for m in tracking.get_metric_history(run.info.run_id, "test_loss")]
        assert sorted(steps) == list(range(0, STEPS + 1, EVERY)), run.info.run_name  # none lost, none twice
