"""Tracker against real MLflow stores: SQLite (bulk SQL and log_batch paths), PostgreSQL (bulk SQL; server
from tests/conftest.py) and a real `mlflow server`.

The same contract tests run on every backend; outage tests kill and restart a real server process.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from orchestrator.ledger import Ledger
from orchestrator.tracking import Tracker, TrackingError

METRICS = ("test_loss", "train_loss", "grad_norm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowServer:
    """A real `mlflow server` on SQLite, in its own process group so it can be killed like a crash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.db_uri = f"sqlite:///{root / 'server.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: starts faster
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.db_uri,
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server did not come up in {timeout}s")

    def ensure_running(self) -> None:
        if not self.alive():
            self.start()

    def kill(self) -> None:
        """SIGKILL the whole server process group (uvicorn and its workers): an abrupt outage."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow SQLite store: copying it saves MLflow's ~5 s of migrations per test."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def sqlite_uri(tmp_path: Path, template_db: Path) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@dataclass
class Backend:
    name: str
    uri: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def tracker(self, experiment: str, **kwargs: Any) -> Tracker:
        return Tracker(self.uri, experiment, **{**self.kwargs, **kwargs})


@pytest.fixture(scope="module")
def postgres_uri(request: pytest.FixtureRequest) -> str:
    """One migrated MLflow database per module; tests keep apart by experiment name. Through psycopg2 (the
    dev extra installs it); ``psycopg_uri`` is the same database through psycopg 3 (both have a COPY path)."""
    make = request.getfixturevalue("postgres_db")
    uri: str = make("mlflow_tracking").replace("postgresql://", "postgresql+psycopg2://", 1)
    MlflowClient(uri).search_experiments()
    return uri


@pytest.fixture(scope="module")
def psycopg_uri(postgres_uri: str) -> str:
    return postgres_uri.replace("postgresql+psycopg2://", "postgresql+psycopg://", 1)


@pytest.fixture(params=["sqlite-bulk", "sqlite-log_batch", pytest.param("postgres-bulk", marks=pytest.mark.postgres),
                        pytest.param("psycopg-bulk", marks=pytest.mark.postgres), "http"])
def backend(request: pytest.FixtureRequest, sqlite_uri: str) -> Backend:
    if request.param == "http":
        server: MlflowServer = request.getfixturevalue("mlflow_server")
        server.ensure_running()
        return Backend("http", server.uri)
    if request.param == "postgres-bulk":
        return Backend("postgres-bulk", request.getfixturevalue("postgres_uri"), {"fast_sql": True})
    if request.param == "psycopg-bulk":
        return Backend("psycopg-bulk", request.getfixturevalue("psycopg_uri"), {"fast_sql": True})
    return Backend(request.param, sqlite_uri, {"fast_sql": request.param == "sqlite-bulk"})


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres),
                        pytest.param("psycopg", marks=pytest.mark.postgres)])
def bulk_uri(request: pytest.FixtureRequest) -> str:
    """A store the bulk SQL path writes: SQLite, PostgreSQL through psycopg2 and through psycopg 3."""
    name = {"sqlite": "sqlite_uri", "postgres": "postgres_uri", "psycopg": "psycopg_uri"}[request.param]
    uri: str = request.getfixturevalue(name)
    return uri


def value(run: int, metric: int, step: int) -> float:
    """Distinct, exactly representable values so read-back can be compared with ==."""
    if metric == 2 and step % 50 == 7:
        return math.nan
    return run * 1000.0 + step + 0.25 * metric


def log_grid(tr: Tracker | Ledger, kids: list[str], steps: range) -> None:
    """The grid of points, through the tracker or (as the drivers send them) through a ledger."""
    for step in steps:
        for i, kid in enumerate(kids):
            values = {m: value(i, j, step) for j, m in enumerate(METRICS)}
            if isinstance(tr, Ledger):
                tr.send(kid, values, step)
            else:
                tr.log_metrics(kid, values, step)


def assert_history(client: MlflowClient, run_id: str, run: int, steps: range) -> None:
    for j, m in enumerate(METRICS):
        hist = sorted(client.get_metric_history(run_id, m), key=lambda x: x.step)
        assert [x.step for x in hist] == list(steps), f"{m}: steps differ"
        for x in hist:
            want = value(run, j, x.step)
            assert (math.isnan(x.value) and math.isnan(want)) or x.value == want


@pytest.fixture
def fluent_uri() -> Iterator[None]:
    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_every_point_written_exactly_once(backend: Backend, fluent_uri: None) -> None:
    exp = f"contract-{uuid.uuid4().hex[:8]}"
    tr = backend.tracker(exp, flush_interval_s=0.05)
    assert tr.uses_fast_sql == backend.name.endswith("-bulk")
    parent = tr.start_parent("sweep", {"lr": 0.1, "widths": [16, 32]}, {"mfsweep.sweep_key": exp})
    kids = [tr.start_child(parent, f"net{i}", f"net-{i}", {"width": 16 * (i + 1), "seed": i}, {"v": "relu"})
            for i in range(20)]
    steps = range(200)
    log_grid(tr, kids, steps)
    for i, kid in enumerate(kids):
        tr.set_tags(kid, {"mfsweep.status": "done"})
        tr.end_run(kid, "FAILED" if i == 3 else "FINISHED")
    tr.log_metrics(parent, {"relu.exponent": -1.01}, 0)
    tr.end_run(parent)
    tr.close()
    s = tr.stats
    assert (s.points_logged, s.pending, s.points_lost) == (20 * 3 * 200 + 1, 0, 0)
    assert s.batches >= 1

    client = MlflowClient(backend.uri)
    for i, kid in enumerate(kids):
        assert_history(client, tr.run_id(kid), i, steps)
    mlflow.set_tracking_uri(backend.uri)
    df = mlflow.search_runs(experiment_names=[exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                            output_format="pandas")
    assert len(df) == 20
    assert sorted(df["tags.mfsweep.key"]) == sorted(f"net{i}" for i in range(20))
    assert set(df["tags.mfsweep.status"]) == {"done"}
    by_key = df.set_index("tags.mfsweep.key")
    assert by_key.loc["net3", "status"] == "FAILED"
    assert (by_key.drop(index="net3")["status"] == "FINISHED").all()
    assert by_key.loc["net5", "params.width"] == "96"
    assert by_key.loc["net5", "tags.mlflow.runName"] == "net-5"
    # latest_metrics (what the UI table shows) must be the last step's value
    assert by_key.loc["net5", "metrics.test_loss"] == value(5, 0, 199)
    prun = client.get_run(parent)
    assert prun.info.status == "FINISHED"
    assert prun.data.params["lr"] == "0.1"
    assert prun.data.metrics["relu.exponent"] == -1.01


def test_resume_reuses_runs_and_never_duplicates(backend: Backend) -> None:
    exp = f"resume-{uuid.uuid4().hex[:8]}"
    tags = {"mfsweep.sweep_key": "sweep-abc"}
    tr = backend.tracker(exp)
    parent = tr.start_parent("sweep", {"lr": 0.1}, tags)
    kids = [tr.start_child(parent, f"net{i}", f"net{i}", {"width": i}, {}) for i in range(4)]
    log_grid(tr, kids, range(100))  # the first session dies after step 99
    tr.end_run(kids[0])
    tr.close()
    ids = [tr.run_id(k) for k in kids]  # MLflow's ids (on a server, kids are this session's handles)

    tr = backend.tracker(exp)
    client = MlflowClient(backend.uri)
    assert tr.start_parent("sweep", {"lr": 0.1}, tags) == parent
    assert client.get_run(parent).info.status == "RUNNING"
    again = [tr.start_child(parent, f"net{i}", f"net{i}", {"width": i}, {}) for i in range(4)]
    assert again == ids
    assert client.get_run(ids[0]).info.status == "RUNNING"
    assert tr.stored_steps(again[1]) == dict.fromkeys(METRICS, 99)
    new = tr.start_child(parent, "net4", "net4", {"width": 4}, {})
    ledger = Ledger(tr, policy=None)  # type: ignore[arg-type]  # send() needs no policy
    log_grid(ledger, [*again, new], range(150))  # replays steps 0..99 from the last checkpoint
    for kid in [*again, new]:
        tr.end_run(kid)
    tr.close()
    assert ledger.points_dropped == 4 * 3 * 100  # dropped once, by the ledger, from the stored steps
    assert tr.stats.points_logged == 4 * 3 * 50 + 3 * 150
    assert tr.run_id(new) not in ids

    for i, kid in enumerate([*ids, tr.run_id(new)]):
        assert_history(client, kid, i, range(150))
        assert client.get_run(kid).info.status == "FINISHED"
    children = client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 5
    assert len(client.search_runs([tr.experiment_id], "tags.`mfsweep.sweep_key` = 'sweep-abc'")) == 1


def test_end_run_waits_for_the_runs_points(sqlite_uri: str) -> None:
    tr = Tracker(sqlite_uri, "order", flush_interval_s=10.0)  # one write cycle holds everything
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
    kid = tr.start_child(parent, "a", "a", {}, {})
    tr.log_metrics(kid, {"x": 1.0}, 0)
    tr.end_run(kid, "KILLED")
    tr.log_metrics(kid, {"x": 2.0}, 1)  # logged after the end: lands in the next segment
    tr.set_tags(kid, {"late": "yes"})
    tr.close()
    run = MlflowClient(sqlite_uri).get_run(kid)
    assert run.info.status == "KILLED"
    assert run.data.tags["late"] == "yes"
    assert [m.value for m in MlflowClient(sqlite_uri).get_metric_history(kid, "x")] == [1.0, 2.0]


def test_rejected_write_is_reported_not_silent(sqlite_uri: str) -> None:
    tr = Tracker(sqlite_uri, "reject")
    parent = tr.start_parent("p", {"lr": 0.1}, {"mfsweep.sweep_key": "k"})
    kid = tr.start_child(parent, "a", "a", {}, {})
    tr.log_metrics(kid, {"x": 1.0}, 0)
    tr.log_params(parent, {"lr": 0.2})  # MLflow forbids changing a param
    with pytest.raises(TrackingError, match="rejected"):
        tr.flush(timeout=30)
    tr.flush(timeout=30)  # reported once; the tracker keeps working
    tr.close()
    assert tr.stats.points_logged == 1


def test_logging_from_many_threads(sqlite_uri: str) -> None:
    tr = Tracker(sqlite_uri, "threads", flush_interval_s=0.05)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
    kids = [tr.start_child(parent, f"n{i}", f"n{i}", {}, {}) for i in range(8)]

    def work(i: int) -> None:
        for step in range(500):
            tr.log_metrics(kids[i], {"a": float(step), "b": -float(step)}, step)
            if step % 100 == 0:
                tr.flush()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tr.close()
    client = MlflowClient(sqlite_uri)
    for kid in kids:
        for key in ("a", "b"):
            assert sorted(m.step for m in client.get_metric_history(kid, key)) == list(range(500))


def test_artifacts_go_next_to_the_database(sqlite_uri: str, tmp_path: Path) -> None:
    src = tmp_path / "summary.json"
    src.write_text('{"exponent": -1.0}')
    with Tracker(sqlite_uri, "artifacts") as tr:
        parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        tr.log_artifact(parent, src)
        tr.log_dict(parent, {"a": 1}, "extra/info.json")
    stored = list((tmp_path / "mlartifacts").rglob("*.json"))
    assert sorted(p.name for p in stored) == ["info.json", "summary.json"]
    names = {a.path for a in MlflowClient(sqlite_uri).list_artifacts(parent)}
    assert names == {"summary.json", "extra"}


def test_bad_input_fails_at_the_call(sqlite_uri: str) -> None:
    with Tracker(sqlite_uri, "bad") as tr:
        run = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        with pytest.raises(ValueError, match="metric name"):
            tr.log_metrics(run, {"bad key!": 1.0}, 0)
        with pytest.raises(ValueError, match="status"):
            tr.end_run(run, "DONE")
    with pytest.raises(TrackingError, match="closed"):
        tr.log_metrics(run, {"x": 1.0}, 0)


def test_unreachable_server_fails_fast() -> None:
    """A dead server is an error at construction, not a hang (how long that takes: bench/tracking.py)."""
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingError) as err:
        Tracker(uri, "nowhere")
    msg = str(err.value)
    assert msg.startswith(f"cannot reach MLflow tracking server at {uri}: ")
    assert "--tracking-uri sqlite:///" in msg
    assert "\n" not in msg


@pytest.mark.slow
def test_server_outage_loses_nothing(mlflow_server: MlflowServer, caplog: pytest.LogCaptureFixture) -> None:
    mlflow_server.ensure_running()
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    tr = Tracker(mlflow_server.uri, f"outage-{uuid.uuid4().hex[:8]}", flush_interval_s=0.1, retry_max_s=300)
    parent = tr.start_parent("p", {"lr": 0.1}, {"mfsweep.sweep_key": "outage"})
    kids = [tr.start_child(parent, f"n{i}", f"n{i}", {"w": i}, {}) for i in range(5)]
    log_grid(tr, kids, range(50))
    tr.flush(timeout=60)

    mlflow_server.kill()
    # Logging returns while the server is still dead (it never waits for it; its caller-side speed during
    # an outage is a figure of bench/tracking.py --outage): the points wait in the queue.
    log_grid(tr, kids, range(50, 120))
    for kid in kids:
        tr.end_run(kid)
    assert not mlflow_server.alive()
    deadline = time.monotonic() + 20
    while tr.stats.retries < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tr.stats.retries >= 2
    assert tr.stats.pending == 5 * 3 * 70
    with pytest.raises(TrackingError, match="timed out"):
        tr.flush(timeout=0.5)

    mlflow_server.start()
    tr.flush(timeout=120)
    tr.close()
    assert (tr.stats.points_logged, tr.stats.pending, tr.stats.points_lost) == (5 * 3 * 120, 0, 0)
    outage_warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(outage_warnings) == 1
    assert "\n" not in outage_warnings[0].getMessage()

    client = MlflowClient(mlflow_server.uri)
    for i, kid in enumerate(kids):
        assert_history(client, tr.run_id(kid), i, range(120))
        assert client.get_run(tr.run_id(kid)).info.status == "FINISHED"


@pytest.mark.slow
def test_new_children_never_wait_on_the_server(mlflow_server: MlflowServer) -> None:
    """On a tracking server, start_child of new networks and their points, tags and ends return while the
    server is down: the writer creates the runs when it is back, before any other write of theirs (else the
    server would reject those writes and points would be lost). One run per network, found again on resume."""
    mlflow_server.ensure_running()
    exp = f"srv-nowait-{uuid.uuid4().hex[:8]}"
    tr = Tracker(mlflow_server.uri, exp, flush_interval_s=0.05, retry_max_s=300)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": exp})
    tr.flush()
    mlflow_server.kill()
    kids: list[str] = []

    def report_path() -> None:
        for i in range(30):
            kid = tr.start_child(parent, f"n{i}", f"n{i}", {"w": i}, {"v": "relu"})
            tr.log_metrics(kid, {"x": float(i)}, 1)
            tr.set_tags(kid, {"mfsweep.status": "done"})
            tr.end_run(kid)
            kids.append(kid)

    t = threading.Thread(target=report_path)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "start_child waited on the dead server"
    assert len(kids) == 30 and not mlflow_server.alive()
    mlflow_server.start()
    tr.close()
    assert (tr.stats.points_logged, tr.stats.points_lost) == (30, 0)
    ids = [tr.run_id(k) for k in kids]
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    for r in runs:
        i = int(r.data.params["w"])
        assert r.info.run_id == ids[i] and r.data.tags["mfsweep.key"] == f"n{i}" and r.info.run_name == f"n{i}"
        assert r.info.status == "FINISHED" and r.data.metrics["x"] == float(i)
        assert r.data.tags["v"] == "relu" and r.data.tags["mfsweep.status"] == "done"

    with Tracker(mlflow_server.uri, exp) as again:
        assert again.start_parent("p", {}, {"mfsweep.sweep_key": exp}) == parent
        assert again.start_child(parent, "n3", "n3", {"w": 3}, {"v": "relu"}) == ids[3]
        assert again.stored_steps(ids[3]) == {"x": 1}
        again.end_run(ids[3])


@pytest.mark.slow
def test_gives_up_after_retry_max_s(mlflow_server: MlflowServer) -> None:
    mlflow_server.ensure_running()
    tr = Tracker(mlflow_server.uri, f"giveup-{uuid.uuid4().hex[:8]}", flush_interval_s=0.05, retry_max_s=1.5)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "giveup"})
    tr.log_metrics(parent, {"a": 1.0}, 0)
    tr.flush(timeout=30)
    mlflow_server.kill()
    for step in range(1, 11):
        tr.log_metrics(parent, {"a": float(step)}, step)
    # Gives up (after retry_max_s; how long that takes is a figure of bench/tracking.py --outage) well before
    # the flush timeout: a flush that waited for its own timeout would say "timed out", not this.
    with pytest.raises(TrackingError, match="10 metric points were not written"):
        tr.flush(timeout=60)
    with pytest.raises(TrackingError, match="gave up"):
        tr.log_metrics(parent, {"a": 0.0}, 99)
    with pytest.raises(TrackingError, match="gave up"):
        tr.close()
    assert tr.stats.points_lost == 10


NAMES = ["test_loss", "a/b", "x.y-z w", "t:1", "", ".", "..", "a/../b", "/abs", "a//b", "a/", "./a", "bad key!",
         "é_ü", "tab\there", "a\\b", "per-network/grad norm"]


def test_metric_name_rule_matches_mlflows() -> None:
    from orchestrator.tracking import metric_name_error

    try:
        from mlflow.exceptions import MlflowException
        from mlflow.utils.validation import _validate_metric_name
    except ImportError as err:
        pytest.fail(f"MLflow's metric name check moved ({err}): re-check tracking.metric_name_error against "
                    "MLflow's documented rule and point this test at the new one")
    for name in NAMES:
        try:
            _validate_metric_name(name)
            mlflow_ok = True
        except MlflowException:
            mlflow_ok = False
        assert (metric_name_error(name) is None) == mlflow_ok, name


def test_bulk_sql_only_on_a_tested_store_schema(sqlite_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    """The bulk SQL path writes MLflow's tables directly: only on a schema revision it was tested with;
    another revision logs through MlflowClient (with a notice) and loses nothing."""
    import sqlalchemy as sa

    from orchestrator.tracking import TESTED_SCHEMA_REVISIONS

    engine = sa.create_engine(sqlite_uri)
    with engine.connect() as conn:
        (revision,) = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
    assert revision in TESTED_SCHEMA_REVISIONS, (
        f"the installed MLflow's store is at schema {revision}: test the bulk SQL path against it, then add it "
        "to tracking.TESTED_SCHEMA_REVISIONS (and widen the mlflow pin in pyproject.toml)")
    with Tracker(sqlite_uri, "tested") as tr:
        assert tr.uses_fast_sql
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    engine.dispose()
    caplog.set_level(logging.WARNING, logger="orchestrator.tracking")
    with Tracker(sqlite_uri, "untested") as tr:
        assert not tr.uses_fast_sql
        parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        kid = tr.start_child(parent, "net-0", "net 0", {}, {})
        log_grid(tr, [kid], range(0, 30))
    notices = [r.getMessage() for r in caplog.records if "f00dfeedbeef" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert_history(MlflowClient(sqlite_uri), kid, 0, range(0, 30))


def test_bulk_created_runs_read_back_like_mlflows_own(bulk_uri: str) -> None:
    """A child run the bulk SQL path creates reads back through MLflow exactly like one made by MLflow's
    create_run + log_batch + set_terminated (the oracle), in get_run and in search_runs filters."""
    client = MlflowClient(bulk_uri)
    tags = {"mfsweep.variant": "relu", "mlflow.user": "someone"}
    params = {"width": 96, "lr": 0.1}
    with Tracker(bulk_uri, f"oracle-{uuid.uuid4().hex[:8]}") as tr:
        assert tr.uses_fast_sql
        parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        ours = tr.start_child(parent, "net5", "net-5", params, tags)
        tr.log_metrics(ours, {"x": 1.0}, 3)
        tr.end_run(ours, "FAILED")
    theirs = client.create_run(tr.experiment_id, run_name="net-5",
                               tags={**tags, "mfsweep.key": "net5", "mlflow.parentRunId": parent}).info.run_id
    client.log_batch(theirs, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_metric(theirs, "x", 1.0, step=3)
    client.set_terminated(theirs, "FAILED")
    a, b = client.get_run(ours), client.get_run(theirs)
    assert a.data.tags == b.data.tags
    assert a.data.params == b.data.params
    assert a.data.metrics == b.data.metrics
    for field_name in ("status", "lifecycle_stage", "user_id", "run_name", "experiment_id"):
        assert getattr(a.info, field_name) == getattr(b.info, field_name), field_name
    assert a.info.artifact_uri == b.info.artifact_uri.replace(theirs, ours)
    assert a.info.end_time is not None and a.info.start_time <= a.info.end_time
    for filt in ("params.width = '96'", "attributes.run_name = 'net-5'", "tags.`mfsweep.variant` = 'relu'",
                 "attributes.status = 'FAILED'", "metrics.x = 1.0", f"tags.mlflow.parentRunId = '{parent}'"):
        assert {r.info.run_id for r in client.search_runs([tr.experiment_id], filt)} == {ours, theirs}, filt


def test_latest_metric_follows_mlflows_rule(bulk_uri: str) -> None:
    """The UI's latest value (latest_metrics) and the histories after out-of-order steps, repeated steps, ties
    of step and timestamp between NaN and numbers, infinities and exact duplicates are what MLflow's own
    log_batch leaves (the oracle), on the bulk SQL path of SQLite and PostgreSQL (COPY + set-based upsert)."""
    seq = [(5, 1.0), (2, 7.0), (5, 0.5), (9, math.nan), (3, math.inf), (9, 2.0), (1, -math.inf)]
    # (step, value, timestamp): ties on (step, timestamp) compare NaN as its stored 0; the first of equals stays
    ties = [(4, -1.0, 5), (4, math.nan, 5), (4, 0.0, 5), (4, -2.0, 5)]
    series: dict[str, list[tuple[int, float, int]]] = {
        "a": [(st, v, 1000 + i) for i, (st, v) in enumerate(seq)],
        "b": [(st, v, 1000 + i) for i, (st, v) in enumerate(seq[::-1])],
        "c": [(st, v, 1000 + i) for i, (st, v) in enumerate(seq[3:])],
        "d": ties, "e": ties[2:0:-1], "f": [(4, math.nan, 5), (4, -0.5, 5), (4, math.nan, 6)],
        "g": [(1, 3.0, 7), (1, 3.0, 7), (0, 9.0, 8), (1, 3.0, 7)],  # an exact duplicate: stored once
    }
    batched = ("c", "e")  # each in one write cycle; the others one point per cycle
    client = MlflowClient(bulk_uri)
    with Tracker(bulk_uri, f"latest-{uuid.uuid4().hex[:8]}") as tr:
        assert tr.uses_fast_sql
        parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        ours = tr.start_child(parent, "a", "a", {}, {})
        for key, points in series.items():
            for step, v, ts in points:
                tr.log_metrics(ours, {key: v}, step, timestamp_ms=ts)
                if key not in batched:
                    tr.flush()
            tr.flush()
    assert tr.stats.points_lost == 0
    theirs = client.create_run(tr.experiment_id).info.run_id
    for key, points in series.items():
        for step, v, ts in points:
            client.log_batch(theirs, metrics=[Metric(key, v, ts, step)])
    a, b = client.get_run(ours).data.metrics, client.get_run(theirs).data.metrics
    assert a.keys() == b.keys() == set(series)
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == b[key], key
    assert math.isnan(a["d"]) and a["e"] == 0.0  # the tie cases are what they say
    for key in a:
        ha = sorted((m.step, m.timestamp, str(m.value)) for m in client.get_metric_history(ours, key))
        hb = sorted((m.step, m.timestamp, str(m.value)) for m in client.get_metric_history(theirs, key))
        assert ha == hb, key
    assert len(client.get_metric_history(ours, "g")) == 2


@pytest.mark.postgres
def test_psycopg3_writes_points_by_binary_copy(psycopg_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through psycopg 3 the points go in COPY's binary format (a silent fall back to text, e.g. when the
    reflected column types stop matching, fails here), and read back exactly, floats to the last bit."""
    from orchestrator.tracking import sqlstore

    formats: list[tuple[str, object]] = []
    real = sqlstore.copy_rows

    def spy(conn: Any, table: str, columns: Any, rows: Any, binary_types: Any = None) -> bool:
        formats.append((table, binary_types))
        return real(conn, table, columns, rows, binary_types)

    monkeypatch.setattr(sqlstore, "copy_rows", spy)
    values = [0.1, 1 / 3, -2.5e-300, 1e300, 7.0, math.pi]
    with Tracker(psycopg_uri, f"binary-{uuid.uuid4().hex[:8]}") as tr:
        assert tr.uses_fast_sql
        parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        child = tr.start_child(parent, "c", "c", {}, {})
        for step, v in enumerate(values):
            tr.log_metrics(child, {"loss": v, "n": step}, step)
    assert ("metrics", sqlstore._METRIC_PG_TYPES) in formats
    history = MlflowClient(psycopg_uri).get_metric_history(child, "loss")
    assert sorted((m.step, m.value) for m in history) == list(enumerate(values))


def test_new_children_never_wait_on_the_store(sqlite_uri: str) -> None:
    """start_child of new networks, their points and ends return while another connection holds the SQLite
    store locked (the writer retries behind them); everything lands once the lock is released."""
    import sqlite3

    tr = Tracker(sqlite_uri, "nowait", flush_interval_s=0.05)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
    tr.flush()
    lock = sqlite3.connect(sqlite_uri.removeprefix("sqlite:///"), timeout=1)
    lock.execute("BEGIN EXCLUSIVE")
    kids: list[str] = []

    def report_path() -> None:
        for i in range(50):
            kid = tr.start_child(parent, f"n{i}", f"n{i}", {"w": i}, {"v": "relu"})
            tr.log_metrics(kid, {"x": float(i)}, 1)
            tr.end_run(kid)
            kids.append(kid)

    t = threading.Thread(target=report_path)
    t.start()
    t.join(timeout=60)
    try:
        assert not t.is_alive(), "start_child waited on the locked store"
        assert len(kids) == 50
    finally:
        lock.rollback()
        lock.close()
    tr.close()
    client = MlflowClient(sqlite_uri)
    runs = client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)
    assert sorted(r.data.tags["mfsweep.key"] for r in runs) == sorted(f"n{i}" for i in range(50))
    assert all(r.info.status == "FINISHED" and r.data.metrics["x"] == float(r.data.params["w"]) for r in runs)


def test_bad_param_fails_at_start_child(sqlite_uri: str) -> None:
    with Tracker(sqlite_uri, "badparam") as tr:
        parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
        with pytest.raises(ValueError, match="param name"):
            tr.start_child(parent, "a", "a", {"bad key!": 1}, {})
        with pytest.raises(ValueError, match="6000"):
            tr.start_child(parent, "a", "a", {"long": "x" * 6001}, {})


def test_group_runs_hold_their_members_curves(sqlite_uri: str) -> None:
    """tracking.runs=group: one child run per group, each member's curve under its own metric keys; the group
    run ends with its last member (FAILED if one failed); a resumed session reuses the group run and drops
    the steps it already holds."""
    client = MlflowClient(sqlite_uri)
    tr = Tracker(sqlite_uri, "groups", flush_interval_s=0.05)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "g"})
    handles = {(w, r): tr.start_member(parent, f"relu-w{w}", f"relu w={w}", f"seed{r}", 3, {"width": w}, {})
               for w in (8, 16) for r in range(3)}
    assert len({h.split("#")[0] for h in handles.values()}) == 2
    for (w, r), h in handles.items():
        for step in range(10):
            tr.log_metrics(h, {"test_loss": w + r + step / 10}, step)
        tr.set_tags(h, {"mfsweep.status": "finished"})
    for r in range(2):
        tr.end_run(handles[(8, r)])
    tr.end_run(handles[(16, 0)], "FAILED")
    tr.flush()
    g8, g16 = handles[(8, 0)].split("#")[0], handles[(16, 0)].split("#")[0]
    assert client.get_run(g8).info.status == "RUNNING"  # one member still training
    tr.end_run(handles[(8, 2)])
    tr.end_run(handles[(16, 1)])
    tr.end_run(handles[(16, 2)])
    tr.close()
    run8 = client.get_run(g8)
    assert run8.info.status == "FINISHED" and client.get_run(g16).info.status == "FAILED"
    assert run8.data.params == {"width": "8"} and run8.data.tags["seed1/mfsweep.status"] == "finished"
    assert set(run8.data.metrics) == {f"seed{r}/test_loss" for r in range(3)}
    for r in range(3):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(g8, f"seed{r}/test_loss"))
        assert hist == [(s, 8 + r + s / 10) for s in range(10)]
    assert len(client.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 2

    tr = Tracker(sqlite_uri, "groups")
    assert tr.start_parent("p", {}, {"mfsweep.sweep_key": "g"}) == parent
    again = tr.start_member(parent, "relu-w8", "relu w=8", "seed1", 3, {"width": 8}, {})
    assert again.split("#")[0] == g8
    assert tr.stored_steps(again) == {"test_loss": 9}
    ledger = Ledger(tr, policy=None)  # type: ignore[arg-type]
    for step in range(12):
        ledger.send(again, {"test_loss": 9 + step / 10}, step)
    tr.close()
    assert ledger.points_dropped == 10 and tr.stats.points_logged == 2
    with Tracker(sqlite_uri, "groups") as tr, pytest.raises(ValueError, match="member"):
        tr.start_member(parent, "relu-w8", "relu w=8", "bad#seed", 3, {}, {})


class _GatedStore:
    """A store whose writes wait for ``gate``; ``fail`` makes them raise a transient error (an outage)."""

    name = "gated"
    creates_runs = False

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.fail = False
        self.writing = threading.Event()
        self.failed = threading.Event()
        self.written = 0

    def plan(self, seg: Any) -> list[Any]:
        from orchestrator.tracking.common import Step

        def write() -> None:
            self.writing.set()
            self.gate.wait()
            if self.fail:
                self.failed.set()
                raise OSError("Connection refused")
            self.written += len(seg.points)

        return [Step("points", sum(len(op.metrics) for op in seg.points), write)]

    def close(self) -> None:
        pass


def test_queue_is_bounded_while_the_store_is_up_not_during_an_outage() -> None:
    from orchestrator.tracking.common import MetricsOp
    from orchestrator.tracking.writer import Writer

    store = _GatedStore()
    w = Writer(store, "fake://", flush_interval_s=0.01, max_batch=1, retry_max_s=20, max_queued=5)
    w.enqueue(MetricsOp("r", {"x": 0.0}, 0, 0), 1)
    assert store.writing.wait(30)  # the writer holds op 0 in a write that waits for the gate
    done = threading.Event()

    def caller() -> None:
        for step in range(1, 21):
            w.enqueue(MetricsOp("r", {"x": 0.0}, step, 0), 1)
        done.set()

    t = threading.Thread(target=caller)
    t.start()
    deadline = time.monotonic() + 30
    while w.waits == 0 and time.monotonic() < deadline:  # wait for the observable event: a caller held back
        time.sleep(0.01)
    assert w.waits >= 1 and not done.is_set()
    assert w.stats.pending == 1 + 5  # the point in the write, and exactly the bound queued
    store.gate.set()
    assert done.wait(30)
    w.flush(timeout=30)
    assert store.written == 21

    # An outage: the write fails (transient), and callers are never held back while it lasts.
    store.gate.clear()
    store.fail = True
    w.enqueue(MetricsOp("r", {"x": 0.0}, 100, 0), 1)
    store.gate.set()
    assert store.failed.wait(30)
    for step in range(101, 131):
        w.enqueue(MetricsOp("r", {"x": 0.0}, step, 0), 1)  # would block at 5 if the bound applied
    assert w.stats.pending == 31
    store.fail = False
    w.close()
    assert store.written == 21 + 31


@pytest.mark.parametrize("fast_sql", [True, False])
def test_rejected_param_takes_no_points_with_it(sqlite_uri: str, fast_sql: bool) -> None:
    """A changed param in the same write cycle as the run's points: MLflow rejects the param (reported), the
    points are still written (params never share a log_batch call with points)."""
    tr = Tracker(sqlite_uri, "param-vs-points", fast_sql=fast_sql, flush_interval_s=10.0)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "k"})
    kid = tr.start_child(parent, "a", "a", {"w": 1}, {})
    tr.flush()
    tr.log_metrics(kid, {"x": 1.0}, 0)
    tr.log_params(kid, {"w": 2})
    tr.set_tags(kid, {"t": "v"})
    with pytest.raises(TrackingError, match="rejected"):
        tr.flush(timeout=30)
    tr.close()
    assert (tr.stats.points_logged, tr.stats.points_lost) == (1, 0)
    run = MlflowClient(sqlite_uri).get_run(kid)
    assert run.data.metrics == {"x": 1.0} and run.data.params == {"w": "1"} and run.data.tags["t"] == "v"


def test_released_runs_are_written_in_full_then_forgotten(backend: Backend) -> None:
    """end_run(release=True), as the sweep ends its networks: every write queued before the end is stored, and
    then the tracker keeps nothing of the run (its memory is bounded by the runs in flight, not the sweep's
    size); a run not released (the parent) is kept."""
    exp = f"release-{uuid.uuid4().hex[:8]}"
    tr = backend.tracker(exp, flush_interval_s=0.05)
    parent = tr.start_parent("sweep", {}, {"mfsweep.sweep_key": exp})
    kids = [tr.start_child(parent, f"net{i}", f"net{i}", {"width": i}, {}) for i in range(12)]
    members = [tr.start_member(parent, "grp", "grp", f"seed{r}", 3, {"width": 99}, {}) for r in range(3)]
    assert tr.runs_held == 1 + 12 + 1 + 1  # the parent, the children, the group run and its group
    log_grid(tr, kids, range(30))
    for i, kid in enumerate(kids):
        tr.set_tags(kid, {"mfsweep.status": "done"})
        tr.end_run(kid, "FAILED" if i == 5 else "FINISHED", release=True)
    for r, m in enumerate(members):
        tr.log_metrics(m, {"test_loss": float(r)}, 7)
        tr.end_run(m, release=True)
    tr.flush()
    assert tr.runs_held == 1
    tr.end_run(parent)
    tr.close()
    assert (tr.stats.points_logged, tr.stats.points_lost) == (12 * 3 * 30 + 3, 0)

    client = MlflowClient(backend.uri)
    runs = {r.data.tags["mfsweep.key"]: r for r in client.search_runs(
        [tr.experiment_id], f"tags.mlflow.parentRunId = '{parent}'", max_results=100)}
    assert sorted(runs) == sorted([*(f"net{i}" for i in range(12)), "grp"])
    for i in range(12):
        run = runs[f"net{i}"]
        assert run.info.status == ("FAILED" if i == 5 else "FINISHED")
        assert run.data.tags["mfsweep.status"] == "done" and run.data.params == {"width": str(i)}
        assert_history(client, run.info.run_id, i, range(30))
    grp = runs["grp"]
    assert grp.info.status == "FINISHED" and grp.data.metrics == {f"seed{r}/test_loss": float(r) for r in range(3)}


def test_release_with_a_full_queue_does_not_deadlock(sqlite_uri: str) -> None:
    """The writer hears of stored ends while a caller may be waiting for it with the run book held (a new
    child's creation queued into a full queue): forgetting released runs must not need that caller."""
    tr = Tracker(sqlite_uri, "release-full", flush_interval_s=0.01, max_batch=1, max_queued=1)
    parent = tr.start_parent("p", {}, {"mfsweep.sweep_key": "release-full"})

    def report_path() -> None:
        for i in range(60):
            kid = tr.start_child(parent, f"n{i}", f"n{i}", {"w": i}, {})
            tr.log_metrics(kid, {"x": float(i)}, 1)
            tr.end_run(kid, release=True)
            # With a queue of one, the next op (the next child's creation, under the run book's lock) waits
            # while the writer stores the end above and hears of it.
            tr.log_metrics(parent, {"done": float(i)}, i)

    t = threading.Thread(target=report_path, daemon=True)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive(), "the report path deadlocked with the writer"
    assert tr._writer.waits > 0  # the queue was full: the case under test happened
    tr.flush()
    assert tr.runs_held == 1
    tr.close()
    assert (tr.stats.points_logged, tr.stats.points_lost) == (120, 0)
