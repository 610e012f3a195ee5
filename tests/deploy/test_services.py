"""Real services on this machine: PostgreSQL (session server from tests/conftest.py) as MLflow's backend store
behind a real `mlflow server` process, and as Optuna's storage; `mfsweep scaling` logs to the server and its
results are read back over MLflow's REST API; the server is stopped and restarted mid-sweep."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _pg_bin, free_port

from .support import DEPLOY, MFSWEEP, ROOT

pytestmark = pytest.mark.postgres


def psycopg_url(url: str) -> str:
    """The same database through the driver the deployment uses (compose: postgresql+psycopg://)."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


class MlflowServer:
    """A `mlflow server` process on 127.0.0.1:port; stop() and start() keep the port and the database."""

    def __init__(self, backend_uri: str, artifacts: Path, log: Path) -> None:
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        with self.log.open("ab") as fh:
            # Own process group: stop() ends the server and its uvicorn workers, and nothing else.
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_uri,
                 "--artifacts-destination", self.artifacts.as_uri(), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # == the group id (start_new_session)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30  # uvicorn workers of the group may outlive the parent briefly
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    # ----------------------------------------------------------------- REST
    def get(self, endpoint: str, **params: Any) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/{endpoint}?{query}", timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def runs(self, experiment: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(parent run, child runs) of the one sweep logged in ``experiment``."""
        exp = self.get("experiments/get-by-name", experiment_name=experiment)["experiment"]
        runs: list[dict[str, Any]] = []
        token = None
        while True:
            body: dict[str, Any] = {"experiment_ids": [exp["experiment_id"]], "max_results": 1000}
            if token:
                body["page_token"] = token
            page = self.post("runs/search", body)
            runs += page.get("runs", [])
            token = page.get("next_page_token")
            if not token:
                break

        def tags(r: dict[str, Any]) -> dict[str, str]:
            return {t["key"]: t["value"] for t in r["data"].get("tags", [])}

        parents = [r for r in runs if "mlflow.parentRunId" not in tags(r)]
        assert len(parents) == 1, [r["info"]["run_name"] for r in parents]
        children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parents[0]["info"]["run_id"]]
        assert len(children) == len(runs) - 1
        return parents[0], children

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        points = self.get("metrics/get-history", run_id=run_id, metric_key=key, max_results=25000)
        return sorted((int(m["step"]), float(m["value"])) for m in points.get("metrics", []))


@pytest.fixture(scope="module")
def mlflow_server(postgres_db: Callable[[str], str], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[MlflowServer]:
    tmp = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(psycopg_url(postgres_db("mlflow")), tmp / "artifacts", tmp / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def small_sweep(name: str, out: Path, tracking_uri: str, *extra: str) -> list[str]:
    sets = ["sweep.widths=[8,16]", "sweep.seeds=2", "sweep.variants=[]", f"name={name}", *extra]
    return [str(MFSWEEP), "scaling", str(ROOT / "configs" / "scaling" / "teacher_relu.yaml"),
            *[x for s in sets for x in ("--set", s)], "--backend", "local", "--tracking-uri", tracking_uri,
            "--out", str(out), "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def test_sweep_results_read_back_over_rest(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """`mfsweep scaling --tracking-uri http://...` against MLflow on PostgreSQL: one parent run with the fit,
    one FINISHED child per network with its full loss curve and final loss, artifacts in the proxied store."""
    name = f"svc_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "sweep"
    steps, every = 60, 20
    cmd = small_sweep(name, out, mlflow_server.url, f"dynamics.steps={steps}", f"dynamics.eval_every={every}",
                      "dynamics.batch_size=64", "task.n_test=256")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    results = {r["net_id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    summary = json.loads((out / "summary.json").read_text())
    parent, children = mlflow_server.runs(name)
    assert parent["info"]["run_id"] == summary["mlflow"]["parent_run_id"]
    assert len(children) == len(results) == 4  # 2 widths x 2 seeds

    for run in children:
        info, data = run["info"], run["data"]
        params = {p["key"]: p["value"] for p in data["params"]}
        assert info["status"] == "FINISHED"
        assert params["width"] in ("8", "16")
        res = results[int(params["net_id"])]
        curve = mlflow_server.history(info["run_id"], "test_loss")
        assert [s for s, _ in curve] == list(range(0, steps + 1, every))  # every report, once
        final = {m["key"]: m["value"] for m in data["metrics"]}["final_test_loss"]
        assert math.isclose(final, res["final_test_loss"], rel_tol=1e-6)

    fit = summary["variants"][0]
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert math.isclose(metrics["base.all_points.exponent"], fit["power_all"]["exponent"], rel_tol=1e-6)
    assert math.isclose(metrics["base.all_points.r2"], fit["power_all"]["r2"], rel_tol=1e-6, abs_tol=1e-9)
    assert metrics["base.n_converged"] == fit["n_converged"]

    listed = mlflow_server.get("artifacts/list", run_id=parent["info"]["run_id"])
    assert {"summary.json", "config.yaml"} <= {f["path"] for f in listed["files"]}
    stored = list(mlflow_server.artifacts.rglob("summary.json"))  # written through the server's proxy
    assert len(stored) == 1 and json.loads(stored[0].read_text()) == summary


@pytest.mark.slow
def test_server_restart_mid_sweep_loses_no_point(mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """Stop `mlflow server` while the sweep trains and logs, restart it on the same port and database: the
    sweep finishes and every child run holds exactly steps/eval_every + 1 points of each curve."""
    name = f"restart_{uuid.uuid4().hex[:8]}"
    out = tmp_path / "sweep"
    steps, every = 16000, 400  # ~10 s of training on one CPU core: the outage lands while it trains
    log = tmp_path / "sweep.log"
    with log.open("w") as fh:
        sweep = subprocess.Popen(small_sweep(name, out, mlflow_server.url, f"dynamics.steps={steps}",
                                             f"dynamics.eval_every={every}"),
                                 stdout=fh, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        # Wait until points are flowing into MLflow, then take the server down mid-sweep.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and sweep.poll() is None:
            try:
                _, children = mlflow_server.runs(name)
                if any(mlflow_server.history(c["info"]["run_id"], "test_loss") for c in children):
                    break
            except (urllib.error.HTTPError, AssertionError, KeyError):
                pass
            time.sleep(0.3)
        assert sweep.poll() is None, f"the sweep ended before the outage:\n{log.read_text()[-3000:]}"
        mlflow_server.stop()
        results = out / "results.jsonl"
        done = len(results.read_text().splitlines()) if results.exists() else 0
        assert done < 4, "training had already finished: the outage was not mid-sweep"
        # Keep it down until the sweep has noticed (its writes fail and are retried), then restart.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "unavailable" not in log.read_text():
            time.sleep(0.3)
        assert "unavailable" in log.read_text(), log.read_text()[-3000:]
        mlflow_server.start()
        rc = sweep.wait(timeout=400)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
        if mlflow_server.proc is None or mlflow_server.proc.poll() is not None:
            mlflow_server.start()  # leave the module's server up for other tests
    assert rc == 0, log.read_text()[-3000:]

    parent, children = mlflow_server.runs(name)
    assert parent["info"]["status"] == "FINISHED"
    assert len(children) == 4
    expected = list(range(0, steps + 1, every))
    for run in children:
        assert run["info"]["status"] == "FINISHED"
        keys = {m["key"] for m in run["data"]["metrics"]} & {"test_loss", "train_loss"}
        assert "test_loss" in keys
        for key in sorted(keys):
            steps_logged = [s for s, _ in mlflow_server.history(run["info"]["run_id"], key)]
            # A train loss averages the steps since the last report: there is none at step 0.
            want = expected if key == "test_loss" else expected[1:]
            assert steps_logged == want, (run["info"]["run_name"], key, len(steps_logged))


def test_search_keeps_its_study_in_postgres(postgres_db: Callable[[str], str], tmp_path: Path) -> None:
    """`mfsweep search --storage postgresql+psycopg://...` (the URL form the deployment uses): the trials of two
    parallel networks land in PostgreSQL, not in a local journal, and what the search reports (summary.json,
    best_config.yaml) is what the stored study holds."""
    import optuna
    import psycopg
    import yaml

    url = psycopg_url(postgres_db("optuna"))
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny", "task": {"kind": "teacher", "dim": 4, "teacher_units": 3, "n_test": 128},
        "model": {"unit": "relu"},
        "dynamics": {"algorithm": "sgd", "lr": 0.2, "steps": 40, "batch_size": 32, "eval_every": 10},
        "execution": {"backend": "local", "device": "cpu"},
        "search": {"trials": 4, "parallel": 2, "width": 8, "sampler": {"name": "random", "seed": 0},
                   "pruner": {"name": "none"},
                   "space": {"dynamics.lr": {"type": "float", "low": 0.01, "high": 2.0, "log": True}}}}))
    out = tmp_path / "search"
    proc = subprocess.run([str(MFSWEEP), "search", str(cfg), "--out", str(out), "--storage", url,
                           "--study", "deploy-search", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "optuna.journal").exists()

    study = optuna.load_study(study_name="deploy-search", storage=url)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["storage"].startswith("postgresql+psycopg://") and summary["n_trials"] == 4
    assert summary["best"]["number"] == study.best_trial.number
    assert summary["best"]["value"] == pytest.approx(study.best_value)
    from orchestrator.config import load

    assert load(out / "best_config.yaml").dynamics.lr == pytest.approx(study.best_params["dynamics.lr"])
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    assert row == (4,)


def test_init_databases_script_against_postgres(postgres_server: str, tmp_path: Path) -> None:
    """deploy/postgres/init-databases.sh: two databases, each owned by its own role, closed to the other;
    a name that is not a plain identifier is refused before any SQL runs."""
    import psycopg

    # The server's own psql (\getenv needs psql >= 15), not Debian's version-picking wrapper.
    bindir = _pg_bin()
    psql = str(bindir / "psql") if bindir and (bindir / "psql").exists() else shutil.which("psql")
    if psql is None:
        pytest.skip("psql not installed")
    server = urllib.parse.urlparse(postgres_server)
    suffix = uuid.uuid4().hex[:8]
    env = {**os.environ, "PATH": f"{Path(psql).parent}{os.pathsep}{os.environ['PATH']}",
           "PGHOST": server.hostname or "127.0.0.1", "PGPORT": str(server.port), "POSTGRES_USER": "postgres",
           "MLFLOW_DB": f"mlflow_{suffix}", "OPTUNA_DB": f"optuna_{suffix}",
           "MLFLOW_DB_PASSWORD": "pw'with\"quotes;--", "OPTUNA_DB_PASSWORD": "x" * 40}
    script = str(DEPLOY / "postgres" / "init-databases.sh")
    proc = subprocess.run([script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(f"{postgres_server}/postgres") as conn:
        owners = dict(conn.execute(
            "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE %s",
            (f"%_{suffix}",)).fetchall())
        cross = conn.execute("SELECT has_database_privilege(%s, %s, 'CONNECT'), "
                             "has_database_privilege(%s, %s, 'CONNECT')",
                             (f"optuna_{suffix}", f"mlflow_{suffix}", f"mlflow_{suffix}", f"mlflow_{suffix}")
                             ).fetchone()
        (pw_set,) = conn.execute("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = %s",
                                 (f"mlflow_{suffix}",)).fetchone()
    assert owners == {f"mlflow_{suffix}": f"mlflow_{suffix}", f"optuna_{suffix}": f"optuna_{suffix}"}
    assert cross == (False, True)
    assert pw_set  # the quote-laden password arrived as a literal, not as SQL

    evil = {"MLFLOW_DB": 'x"; DROP DATABASE postgres; --', "OPTUNA_DB": f"o2_{suffix}"}
    bad = subprocess.run([script], capture_output=True, text=True, timeout=60, env={**env, **evil})
    assert bad.returncode == 1 and "invalid database name" in bad.stderr
    with psycopg.connect(f"{postgres_server}/postgres") as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (f"o2_{suffix}",)
                            ).fetchone() == (0,)
