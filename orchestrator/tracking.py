"""Batched, non-blocking MLflow logging for sweeps of thousands of networks.

This is the only module of the project that imports mlflow (besides :mod:`.libcompat`'s lazy imports).
Callers enqueue metrics, params, tags and run ends; one background thread groups them per run and writes them
in batches, retrying through outages.

Write paths:
    * ``http(s)://`` tracking servers: ``runs/log-batch`` and ``runs/update`` REST calls with MLflow's own
      request code but without its built-in multi-minute retry loop (our own backoff replaces it, so a
      restarted server is picked up within seconds). That code is not public API: it is reached only
      through :mod:`orchestrator.libcompat`, imported when a call needs it.
    * ``sqlite:///`` and ``postgresql://`` stores: metric points go straight into MLflow's ``metrics`` /
      ``latest_metrics`` tables with one bulk upsert per write cycle, only on a store whose schema revision
      (``alembic_version``) is one it was tested with and whose reflected tables and primary keys match.
      MLflow's ORM-based ``log_batch`` tops out near 8k points/s on SQLite, below the 10k/s a packed GPU
      sweep produces. Params, tags and run status still go through ``MlflowClient``.
    * any other store: ``MlflowClient.log_batch``.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlparse

import sqlalchemy as sa
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from . import libcompat
from .errors import TrackingError

__all__ = ["Tracker", "TrackerStats", "TrackingError"]

_log = logging.getLogger(__name__)
# Store creation narrates its schema migrations at INFO; a sweep's console is for the sweep.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)
T = TypeVar("T")

SWEEP_KEY_TAG = "mfsweep.sweep_key"
# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, tokens, latency); a sweep's
# experiment holds training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
CHILD_KEY_TAG = "mfsweep.key"
PARENT_TAG = "mlflow.parentRunId"

# MLflow's log_batch limits (mlflow.utils.validation): per call <= 1000 metrics, <= 100 params, <= 100 tags.
_MAX_METRICS_PER_CALL = 1000
_MAX_PARAMS_TAGS_PER_CALL = 100
# Bulk SQL statements are chunked so one write never holds the database (SQLite: file) lock for long.
_SQL_ROWS_PER_TXN = 50_000
_HTTP_TIMEOUT_S = 60
_PROBE_TIMEOUT_S = 5
_BACKOFF_FIRST_S = 0.2
_BACKOFF_CAP_S = 3.0
# MlflowException codes that retrying cannot fix (bad input, missing run, auth); everything else is treated
# as an outage (connection errors, 5xx, "database is locked").
_PERMANENT_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND",
    "FEATURE_DISABLED", "MALFORMED_REQUEST",
})
_MAX_DOUBLE = 1.7976931348623157e308
# MLflow store schema versions (alembic revisions) the bulk SQL path was tested against: MLflow 3.17's head.
# A store at any other revision is written through MlflowClient (a newer MLflow may change how it stores or
# aggregates metrics even where the columns look the same).
TESTED_SCHEMA_REVISIONS = frozenset({"dc11669786a5"})
# SQL dialects whose INSERT ... ON CONFLICT the bulk path uses.
_BULK_DIALECTS: dict[str, Callable[[sa.Table], Any]] = {
    "sqlite": sqlite_insert, "postgresql": postgresql_insert}


@dataclass(frozen=True)
class TrackerStats:
    """Counters of a Tracker; metric points only (params/tags/status are not counted)."""

    points_logged: int
    """Metric points written to the store."""
    batches: int
    """Write calls made (log_batch calls or bulk SQL transactions)."""
    retries: int
    """Failed write attempts that were retried."""
    pending: int
    """Points accepted but neither written nor lost yet."""
    points_skipped: int
    """Points dropped on purpose: step already stored in a reused (resumed) child run."""
    points_lost: int
    """Points that could not be written (reported through TrackingError)."""


class _MetricsOp(NamedTuple):
    run_id: str
    metrics: dict[str, float]
    step: int
    timestamp_ms: int


class _ParamsOp(NamedTuple):
    run_id: str
    params: dict[str, str]


class _TagsOp(NamedTuple):
    run_id: str
    tags: dict[str, str]


class _EndOp(NamedTuple):
    run_id: str
    status: str
    end_time_ms: int


_Op = _MetricsOp | _ParamsOp | _TagsOp | _EndOp


@dataclass
class _Segment:
    """Ops of one write cycle that can be written in any order per kind: params/tags, then points, then ends.

    A segment never holds an op for a run after that run's end op, so ends are applied after all their
    points (the next segment gets the rest).
    """

    params: dict[str, dict[str, str]]
    tags: dict[str, dict[str, str]]
    points: list[_MetricsOp]
    ends: dict[str, _EndOp]


class _Step(NamedTuple):
    what: str
    n_points: int
    fn: Callable[[], None]


class _GiveUp(Exception):
    """Internal: retries exhausted; the tracker is now broken."""


def _now_ms() -> int:
    return int(time.time() * 1000)


# MLflow wraps connection errors in long multi-line messages; these substrings name the root cause.
_REASONS = (("Connection refused", "connection refused"), ("timed out", "timed out"),
            ("Name or service not known", "unknown host"), ("database is locked", "database is locked"),
            ("Connection aborted", "connection aborted"),
            ("RemoteDisconnected", "connection closed by server"))


def _one_line(exc: BaseException) -> str:
    """Short reason for console messages: the recognizable root cause, else the first line."""
    text = str(exc)
    for needle, short in _REASONS:
        if needle in text:
            return short
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT_CODES
    # requests' errors are OSErrors; a locked SQLite file or a dropped database connection is an
    # OperationalError. Anything else (IntegrityError, TypeError, ...) will not fix itself.
    return isinstance(exc, OSError | sa.exc.OperationalError | sa.exc.InterfaceError
                      | sa.exc.DisconnectionError)


def _quote(value: str) -> str:
    """A string literal for MLflow's search filter grammar (which has no escape sequences)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for {value!r}: it contains both quote characters")


# MLflow's documented rule for metric (and param) names: alphanumerics, underscores, dashes, periods, spaces,
# slashes and (except on Windows) colons, and a name that is also a valid unique file path.
_METRIC_NAME = re.compile(r"^[/\w.\- ]*$" if os.name == "nt" else r"^[/\w.\- :]*$")


def metric_name_error(name: str) -> str | None:
    """Why MLflow would reject ``name`` as a metric name, or None."""
    if not _METRIC_NAME.match(name):
        allowed = "" if os.name == "nt" else ", colons (:)"
        return (f"names may only contain alphanumerics, underscores (_), dashes (-), periods (.), spaces ( )"
                f"{allowed} and slashes (/)")
    norm = posixpath.normpath(name)
    if norm != name or norm == "." or norm.startswith(("..", "/")):
        return f"names are used as file paths and must not resolve to another name (this one resolves to {norm!r})"
    return None


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


class Tracker:
    """Asynchronous MLflow logger: a parent run per sweep, a child run per network.

    Invariants:
        * ``log_metrics``/``log_params``/``set_tags``/``end_run`` only enqueue; they never wait on I/O
          (the queue is unbounded: memory grows while the store is down).
        * An ``end_run`` is applied after every point, param and tag of that run enqueued before it; a
          later tag value overwrites an earlier one; a changed param value is rejected by MLflow (reported).
        * A point is either written, skipped on purpose (its step is already stored in a reused child run:
          see ``start_child``), or counted as lost and reported by a ``TrackingError`` from
          ``flush``/``close``. Transient failures (server down, database locked) are retried with capped
          exponential backoff until ``retry_max_s`` passes without a successful write; then the tracker is
          broken and every later call raises ``TrackingError``.
        * Retried writes are idempotent (same timestamps; MLflow ignores exact duplicate points).
        * ``start_parent``/``start_child`` are idempotent per sweep key / network key, so a resumed sweep
          continues its runs instead of creating new ones.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, flush_interval_s: float = 0.5,
                 max_batch: int = 1000, retry_max_s: float = 600.0, fast_sql: bool | None = None,
                 artifact_location: str | None = None, experiment_tags: Mapping[str, str] | None = None) -> None:
        """Connect (fail fast if unreachable), create/get ``experiment`` and start the writer thread.

        ``fast_sql``: bulk-insert points into a SQLite/PostgreSQL store (default: on for those; False
        forces ``MlflowClient.log_batch``). ``artifact_location`` for a newly created experiment; for SQLite
        stores it defaults to ``mlartifacts/`` next to the database file instead of MLflow's ``./mlruns``
        in the current directory. ``experiment_tags`` are set on a newly created experiment (e.g. its
        description, ``mlflow.note.content``); every experiment gets the model-training kind tag unless it has
        a kind already.
        """
        if flush_interval_s <= 0 or max_batch <= 0 or retry_max_s < 0:
            raise ValueError("flush_interval_s and max_batch must be > 0 and retry_max_s >= 0")
        self.tracking_uri = tracking_uri
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._retry_max_s = retry_max_s
        scheme = urlparse(tracking_uri).scheme.lower()
        self._is_http = scheme in ("http", "https")
        self._is_sqlite = scheme == "sqlite"
        dialect = scheme.split("+")[0]
        self._bulk_dialect = dialect if dialect in _BULK_DIALECTS else None
        if self._is_http:
            self._probe_http()
        elif self._is_sqlite:
            self._prepare_sqlite_path()
        self._client = MlflowClient(tracking_uri=tracking_uri)
        try:
            self.experiment_id = self._get_or_create_experiment(experiment, artifact_location,
                                                                dict(experiment_tags or {}))
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"cannot use MLflow store at {tracking_uri}: {_one_line(exc)}; check the URI "
                                f"or pass --tracking-uri sqlite:///<dir>/mlflow.db") from exc
        self.experiment_name = experiment

        self._engine: sa.Engine | None = None
        self._fast_stmts: tuple[Any, Any] | None = None
        if self._bulk_dialect is not None and fast_sql is not False:
            self._setup_fast_sql()
        elif fast_sql and self._bulk_dialect is None:
            raise ValueError(f"fast_sql needs a sqlite:// or postgresql:// tracking URI, got {tracking_uri}")

        # Run bookkeeping, guarded by _runs_lock (start_* may be called from several threads).
        self._runs_lock = threading.RLock()
        self._fresh_parents: set[str] = set()
        self._children: dict[str, dict[str, str]] = {}
        self._own_runs: set[str] = set()  # runs started here: the only ones the fast SQL path writes to
        self._floors: dict[str, dict[str, int]] = {}  # run -> metric key -> max step already stored
        self._valid_keys: set[str] = set()

        # Queue state, guarded by _cv.
        self._cv = threading.Condition()
        self._ops: list[_Op] = []
        self._queued_points = 0
        self._seq_enqueued = 0
        self._seq_done = 0
        self._flush_waiters = 0
        self._closing = False
        self._closed = False
        self._broken: str | None = None
        self._unreported: list[str] = []
        self._points_enqueued = 0
        self._points_logged = 0
        self._points_skipped = 0
        self._points_lost = 0
        self._batches = 0
        self._retries = 0
        self._outage_since: float | None = None

        self._thread = threading.Thread(target=self._writer, name="mfsweep-mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ connection
    def _probe_http(self) -> None:
        """One quick request without MLflow's retry loop (which takes minutes against a dead server)."""
        endpoint = "/api/2.0/mlflow/experiments/search"
        try:
            resp = libcompat.mlflow_request(self.tracking_uri, endpoint, {"max_results": 1},
                                            timeout=_PROBE_TIMEOUT_S, check=False)
        except libcompat.LibraryChanged as exc:
            raise TrackingError(str(exc)) from None
        except Exception as exc:
            raise TrackingError(f"cannot reach MLflow tracking server at {self.tracking_uri}: "
                                f"{_one_line(exc)}; start it (mlflow server ...) or pass "
                                f"--tracking-uri sqlite:///<dir>/mlflow.db") from exc
        if resp.status_code in (401, 403):
            raise TrackingError(f"MLflow tracking server at {self.tracking_uri} refused access "
                                f"(HTTP {resp.status_code}); set MLFLOW_TRACKING_TOKEN or "
                                f"MLFLOW_TRACKING_USERNAME/PASSWORD")
        if resp.status_code != 200:
            raise TrackingError(f"{self.tracking_uri} does not answer like an MLflow tracking server "
                                f"(HTTP {resp.status_code} on {endpoint}); check the URI")

    def _sqlite_path(self) -> Path | None:
        database = sa.engine.make_url(self.tracking_uri).database
        return None if not database or database == ":memory:" else Path(database)

    def _prepare_sqlite_path(self) -> None:
        db = self._sqlite_path()
        if db is None:
            return
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the directory of MLflow store {self.tracking_uri}: "
                                f"{exc.strerror}; pass a writable --tracking-uri") from exc

    def _get_or_create_experiment(self, name: str, artifact_location: str | None, tags: dict[str, str]) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            if artifact_location is None and self._is_sqlite and (db := self._sqlite_path()) is not None:
                artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
            try:
                return str(self._client.create_experiment(
                    name, artifact_location=artifact_location,
                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, **tags}))
            except MlflowException as exc:  # another process created it first
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self._client.get_experiment_by_name(name)
                assert exp is not None
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted; restore it "
                                f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or use "
                                f"another name")
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older mfsweep: open it on its runs too
            self._client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return str(exp.experiment_id)

    def _setup_fast_sql(self) -> None:
        """Reflect MLflow's metric tables; fall back to log_batch if the schema is not the expected one."""
        try:
            # A long busy timeout: the MLflow UI or our own run creation may hold the SQLite lock briefly.
            connect_args = {"timeout": 60} if self._is_sqlite else {}
            engine = sa.create_engine(self.tracking_uri, connect_args=connect_args, pool_pre_ping=True)
            md = sa.MetaData()
            metrics = sa.Table("metrics", md, autoload_with=engine)
            latest = sa.Table("latest_metrics", md, autoload_with=engine)
            with engine.connect() as conn:
                revisions = {str(r) for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                             .scalars()}
        except Exception as exc:
            _log.info("MLflow bulk SQL path off (%s); using log_batch", _one_line(exc))
            return
        if not revisions or not revisions <= TESTED_SCHEMA_REVISIONS:
            _log.warning("MLflow store schema %s is not one mfsweep's bulk SQL path was tested with; logging "
                         "metrics through MlflowClient.log_batch (slower)", ",".join(sorted(revisions)) or "unknown")
            engine.dispose()
            return
        cols = {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}
        latest_pk = {c.name for c in latest.primary_key.columns}
        if {c.name for c in metrics.c} != cols or {c.name for c in latest.c} != cols or \
                latest_pk != {"key", "run_uuid"}:
            _log.info("MLflow metric tables differ from the known schema; using log_batch")
            engine.dispose()
            return
        insert = _BULK_DIALECTS[engine.dialect.name]
        ins_points = insert(metrics).on_conflict_do_nothing()  # exact duplicates: a retried write
        up = insert(latest)
        # Same rule as MLflow's _update_latest_metrics_if_necessary: keep the max (step, timestamp, value).
        ins_latest = up.on_conflict_do_update(
            index_elements=[latest.c.key, latest.c.run_uuid],
            set_={"value": up.excluded.value, "timestamp": up.excluded.timestamp,
                  "step": up.excluded.step, "is_nan": up.excluded.is_nan},
            where=sa.tuple_(up.excluded.step, up.excluded.timestamp, up.excluded.value)
            > sa.tuple_(latest.c.step, latest.c.timestamp, latest.c.value))
        self._engine = engine
        self._fast_stmts = (ins_points, ins_latest)

    @property
    def uses_fast_sql(self) -> bool:
        """True when points go to the SQL store by bulk upsert rather than MlflowClient.log_batch."""
        return self._fast_stmts is not None

    # ------------------------------------------------------------------ synchronous calls
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a synchronous MLflow call, retrying outages like the writer does."""
        self._check_usable()
        t0 = time.monotonic()
        delay = _BACKOFF_FIRST_S
        warned = False
        while True:
            try:
                return fn()
            except Exception as exc:
                if not _is_transient(exc):
                    raise TrackingError(f"MLflow rejected {what}: {_one_line(exc)}") from exc
                waited = time.monotonic() - t0
                if waited >= self._retry_max_s:
                    raise TrackingError(f"gave up on {what} after {waited:.0f}s: MLflow at "
                                        f"{self.tracking_uri} unavailable ({_one_line(exc)}); restart it "
                                        f"and resume the sweep") from exc
                if not warned:
                    _log.warning("MLflow at %s unavailable during %s (%s); retrying for up to %.0fs",
                                 self.tracking_uri, what, _one_line(exc), self._retry_max_s)
                    warned = True
                time.sleep(min(delay, max(0.0, self._retry_max_s - waited)))
                delay = min(delay * 2, _BACKOFF_CAP_S)

    def _find_runs(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token: str | None = None
        while True:
            page = self._client.search_runs([self.experiment_id], filter_string=filter_string,
                                            run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                            order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def start_parent(self, run_name: str, params: Mapping[str, object], tags: Mapping[str, str]) -> str:
        """Create the sweep's parent run, or reuse the one tagged with the same ``mfsweep.sweep_key``."""
        with self._runs_lock:
            return self._start_parent(run_name, params, tags)

    def _start_parent(self, run_name: str, params: Mapping[str, object], tags: Mapping[str, str]) -> str:
        tags = {k: str(v) for k, v in tags.items()}
        sweep_key = tags.get(SWEEP_KEY_TAG)
        run_id: str | None = None
        if sweep_key is not None:
            found = self._call("search for the sweep's parent run", lambda: self._find_runs(
                f"tags.`{SWEEP_KEY_TAG}` = {_quote(sweep_key)}"))
            if len(found) > 1:
                _log.warning("%d MLflow runs carry %s=%s; reusing the oldest", len(found), SWEEP_KEY_TAG,
                             sweep_key)
            if found:
                run_id = str(found[0].info.run_id)
                rid = run_id
                self._call("reopen the parent run", lambda: self._client.update_run(rid, status="RUNNING"))
        if run_id is None:
            run = self._call("create the parent run", lambda: self._client.create_run(
                self.experiment_id, tags=tags, run_name=run_name))
            run_id = str(run.info.run_id)
            self._fresh_parents.add(run_id)
        self._own_runs.add(run_id)
        self.set_tags(run_id, tags)
        self.log_params(run_id, params)
        return run_id

    def start_child(self, parent_id: str, key: str, run_name: str, params: Mapping[str, object],
                    tags: Mapping[str, str]) -> str:
        """Create the child run of network ``key`` under ``parent_id``, or reuse it.

        On reuse the run is set back to RUNNING and, for each metric, the largest step already stored is
        remembered: later points of that metric with step <= it are dropped (counted in
        ``stats.points_skipped``), so a resumed sweep never stores a point twice.
        """
        with self._runs_lock:
            return self._start_child(parent_id, key, run_name, params, tags)

    def _start_child(self, parent_id: str, key: str, run_name: str, params: Mapping[str, object],
                     tags: Mapping[str, str]) -> str:
        tags = {**{k: str(v) for k, v in tags.items()}, CHILD_KEY_TAG: key, PARENT_TAG: parent_id}
        children = self._children.get(parent_id)
        if children is None:
            children = {}
            if parent_id not in self._fresh_parents:
                found = self._call("list the sweep's child runs", lambda: self._find_runs(
                    f"tags.`{PARENT_TAG}` = {_quote(parent_id)}"))
                for r in found:
                    k = r.data.tags.get(CHILD_KEY_TAG)
                    if k is not None:
                        children.setdefault(k, str(r.info.run_id))
            self._children[parent_id] = children
        run_id = children.get(key)
        if run_id is None:
            run = self._call(f"create child run {key}", lambda: self._client.create_run(
                self.experiment_id, tags=tags, run_name=run_name))
            run_id = str(run.info.run_id)
            children[key] = run_id
        else:
            if run_id in self._own_runs:
                self.flush()  # reused within this session: its queued points must be visible first
            self._floors[run_id] = self._stored_steps(run_id)
            rid = run_id
            self._call(f"reopen child run {key}", lambda: self._client.update_run(rid, status="RUNNING"))
            self.set_tags(run_id, tags)
        self._own_runs.add(run_id)
        self.log_params(run_id, params)
        return run_id

    def _stored_steps(self, run_id: str) -> dict[str, int]:
        run = self._call("read a reused run", lambda: self._client.get_run(run_id))
        floors: dict[str, int] = {}
        for metric_key in run.data.metrics:
            hist = self._call("read a metric history",
                              partial(self._client.get_metric_history, run_id, metric_key))
            if hist:
                floors[metric_key] = max(int(m.step) for m in hist)
        return floors

    def stored_steps(self, run_id: str) -> Mapping[str, int]:
        """Largest step stored per metric when ``run_id`` was reused (empty for new runs)."""
        return dict(self._floors.get(run_id, {}))

    # ------------------------------------------------------------------ enqueue
    def _check_usable(self) -> None:
        if self._broken is not None:
            raise TrackingError(self._broken)
        if self._closed or self._closing:
            raise TrackingError("the MLflow tracker is closed; create a new Tracker")

    def _enqueue(self, op: _Op, n_points: int = 0) -> None:
        with self._cv:
            self._check_usable()
            self._ops.append(op)
            self._seq_enqueued += 1
            self._queued_points += n_points
            self._points_enqueued += n_points
            if self._queued_points >= self._max_batch:
                self._cv.notify_all()

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """Enqueue one point per metric at ``step``. NaN and +-inf are allowed."""
        values = {str(k): float(v) for k, v in metrics.items()}
        for k in values:
            if k not in self._valid_keys:
                why = metric_name_error(k)
                if why is not None:
                    raise ValueError(f"invalid MLflow metric name {k!r}: {why}")
                self._valid_keys.add(k)
        floors = self._floors.get(run_id)
        if floors:
            kept = {k: v for k, v in values.items() if step > floors.get(k, -(2 ** 63))}
            if len(kept) != len(values):
                with self._cv:
                    self._points_skipped += len(values) - len(kept)
            values = kept
        if not values:
            return
        ts = _now_ms() if timestamp_ms is None else int(timestamp_ms)
        self._enqueue(_MetricsOp(run_id, values, int(step), ts), len(values))

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Enqueue params (stringified). Re-logging a param with the same value is allowed."""
        if params:
            self._enqueue(_ParamsOp(run_id, {str(k): str(v) for k, v in params.items()}))

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        """Enqueue tags (stringified); a later value overwrites an earlier one."""
        if tags:
            self._enqueue(_TagsOp(run_id, {str(k): str(v) for k, v in tags.items()}))

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Enqueue the run's end; applied after everything enqueued for it before."""
        if status not in ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"unknown MLflow run status {status!r}; use FINISHED, FAILED or KILLED")
        self._enqueue(_EndOp(run_id, status, _now_ms()))

    # ------------------------------------------------------------------ artifacts (synchronous)
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file now (retrying outages)."""
        local = str(path)
        self._call(f"upload {Path(local).name}",
                   lambda: self._client.log_artifact(run_id, local, artifact_path))

    def log_dict(self, run_id: str, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Store a JSON/YAML artifact (format from the file extension)."""
        data = dict(dictionary)
        self._call(f"upload {artifact_file}", lambda: self._client.log_dict(run_id, data, artifact_file))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as an image artifact."""
        self._call(f"upload {artifact_file}", lambda: self._client.log_figure(run_id, figure, artifact_file))

    # ------------------------------------------------------------------ flush / close / stats
    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued so far is written; raise TrackingError on loss or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            target = self._seq_enqueued
            self._flush_waiters += 1
            self._cv.notify_all()
            try:
                while self._seq_done < target and self._broken is None and self._thread.is_alive():
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        pending = self._points_enqueued - self._points_logged - self._points_lost
                        raise TrackingError(f"MLflow flush timed out after {timeout}s with {pending} points "
                                            f"pending; MLflow at {self.tracking_uri} is slow or down")
                    self._cv.wait(remaining)
            finally:
                self._flush_waiters -= 1
            self._raise_unreported()

    def _raise_unreported(self) -> None:
        """Under _cv: raise once for losses not yet reported."""
        if self._broken is not None:
            raise TrackingError(self._broken)
        if self._unreported:
            msgs, self._unreported = self._unreported, []
            more = f" (+{len(msgs) - 1} more)" if len(msgs) > 1 else ""
            raise TrackingError(msgs[0] + more)

    def close(self) -> None:
        """Flush, stop the writer thread and release connections; raise TrackingError on loss."""
        with self._cv:
            if self._closed:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        with self._cv:
            self._closed = True
        if self._engine is not None:
            self._engine.dispose()
        with self._cv:
            if self._broken is not None:
                msg, self._broken = self._broken, None  # reported once; closed from now on
                raise TrackingError(msg)
            self._raise_unreported()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception already propagating
            self.close()
        except TrackingError as err:
            _log.error("%s", err)

    @property
    def stats(self) -> TrackerStats:
        with self._cv:
            return TrackerStats(
                points_logged=self._points_logged, batches=self._batches, retries=self._retries,
                pending=self._points_enqueued - self._points_logged - self._points_lost,
                points_skipped=self._points_skipped, points_lost=self._points_lost)

    # ------------------------------------------------------------------ writer thread
    def _writer(self) -> None:
        while True:
            with self._cv:
                deadline = time.monotonic() + self._flush_interval_s
                # A flush only cuts the wait short when there is something to write.
                while not (self._closing or (self._flush_waiters and self._ops)
                           or self._queued_points >= self._max_batch):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                ops, self._ops = self._ops, []
                self._queued_points = 0
                last_seq = self._seq_enqueued
                closing = self._closing
            if ops:
                done_before = self._points_logged + self._points_lost
                try:
                    self._write(ops)
                except Exception as exc:  # a bug here must not hang flush(): count the rest as lost
                    _log.exception("MLflow writer failed")
                    self._fail_rest(ops, done_before,
                                    f"MLflow writer crashed ({_one_line(exc)}); report this bug")
            with self._cv:
                self._seq_done = last_seq
                self._cv.notify_all()
                if closing and not self._ops:
                    return

    def _fail_rest(self, ops: Sequence[_Op], done_before: int, msg: str) -> None:
        with self._cv:
            n = sum(len(op.metrics) for op in ops if isinstance(op, _MetricsOp)) - (
                self._points_logged + self._points_lost - done_before)
            self._points_lost += n
            self._unreported.append(f"{msg}; {n} metric points were not written")

    def _write(self, ops: list[_Op]) -> None:
        if self._broken is not None:  # gave up earlier; _give_up already counted these points as lost
            return
        for seg in self._segments(ops):
            for step in self._steps(seg):
                try:
                    self._run_step(step)
                except _GiveUp:
                    return

    @staticmethod
    def _segments(ops: list[_Op]) -> list[_Segment]:
        segs = [_Segment({}, {}, [], {})]
        for op in ops:
            seg = segs[-1]
            # A new segment after the run's end, and before a param that changes a value already in this
            # segment (merging would hide the first value; MLflow must see and reject the change).
            old = seg.params.get(op.run_id, {})
            changes = isinstance(op, _ParamsOp) and any(old.get(k, v) != v for k, v in op.params.items())
            if op.run_id in seg.ends or changes:
                seg = _Segment({}, {}, [], {})
                segs.append(seg)
            if isinstance(op, _MetricsOp):
                seg.points.append(op)
            elif isinstance(op, _ParamsOp):
                seg.params.setdefault(op.run_id, {}).update(op.params)
            elif isinstance(op, _TagsOp):
                seg.tags.setdefault(op.run_id, {}).update(op.tags)
            else:
                seg.ends[op.run_id] = op
        return segs

    def _steps(self, seg: _Segment) -> list[_Step]:
        steps: list[_Step] = []
        for run_id in dict.fromkeys([*seg.params, *seg.tags]):
            params = [Param(k, v) for k, v in seg.params.get(run_id, {}).items()]
            tags = [RunTag(k, v) for k, v in seg.tags.get(run_id, {}).items()]
            for i in range(0, max(len(params), len(tags)), _MAX_PARAMS_TAGS_PER_CALL):
                p = params[i:i + _MAX_PARAMS_TAGS_PER_CALL]
                t = tags[i:i + _MAX_PARAMS_TAGS_PER_CALL]
                steps.append(_Step(f"params/tags of run {run_id}", 0,
                                   partial(self._log_batch, run_id, [], p, t)))

        def is_fast(op: _MetricsOp) -> bool:
            return self._fast_stmts is not None and op.run_id in self._own_runs

        fast = [op for op in seg.points if is_fast(op)]
        if fast:
            rows = [{"key": k, "value": v, "timestamp": op.timestamp_ms, "step": op.step,
                     "run_uuid": op.run_id, "is_nan": False} for op in fast for k, v in op.metrics.items()]
            for rows_chunk in _chunks(rows, _SQL_ROWS_PER_TXN):
                steps.append(_Step(f"{len(rows_chunk)} metric points", len(rows_chunk),
                                   partial(self._insert_rows, rows_chunk)))
        per_run: dict[str, list[Metric]] = {}
        for op in seg.points:
            if is_fast(op):
                continue
            lst = per_run.setdefault(op.run_id, [])
            lst.extend(Metric(k, v, op.timestamp_ms, op.step) for k, v in op.metrics.items())
        for run_id, metrics in per_run.items():
            for chunk in _chunks(metrics, _MAX_METRICS_PER_CALL):
                steps.append(_Step(f"metrics of run {run_id}", len(chunk),
                                   partial(self._log_batch, run_id, chunk, [], [])))
        for end in seg.ends.values():
            steps.append(_Step(f"end of run {end.run_id}", 0, partial(self._end, end)))
        return steps

    def _run_step(self, step: _Step) -> None:
        """Apply one write, retrying outages; permanent errors are recorded (not retried)."""
        delay = _BACKOFF_FIRST_S
        while True:
            try:
                step.fn()
            except Exception as exc:
                if not _is_transient(exc):
                    msg = f"MLflow rejected {step.what}: {_one_line(exc)}"
                    _log.error("%s", msg)
                    with self._cv:
                        self._points_lost += step.n_points
                        self._unreported.append(
                            f"{msg}; {step.n_points} metric points were not written" if step.n_points
                            else msg)
                    return
                now = time.monotonic()
                with self._cv:
                    self._retries += 1
                    first = self._outage_since is None
                    if first:
                        self._outage_since = now
                    since = self._outage_since
                    pending = self._points_enqueued - self._points_logged - self._points_lost
                assert since is not None
                if first:
                    _log.warning("MLflow at %s unavailable (%s); keeping %d points buffered, retrying for "
                                 "up to %.0fs", self.tracking_uri, _one_line(exc), pending, self._retry_max_s)
                if now - since >= self._retry_max_s:
                    self._give_up(exc, now - since)
                    raise _GiveUp from exc
                time.sleep(min(delay, max(0.05, self._retry_max_s - (now - since))))
                delay = min(delay * 2 * (0.75 + 0.5 * random.random()), _BACKOFF_CAP_S)
                continue
            with self._cv:
                self._batches += 1
                self._points_logged += step.n_points
                if self._outage_since is not None:
                    _log.info("MLflow at %s is back after %.1fs; writing the backlog", self.tracking_uri,
                              time.monotonic() - self._outage_since)
                    self._outage_since = None
            return

    def _give_up(self, exc: BaseException, waited: float) -> None:
        with self._cv:
            # Everything not yet written is lost: this cycle's remainder and whatever is still queued.
            lost = self._points_enqueued - self._points_logged - self._points_lost
            self._points_lost += lost
            msg = (f"gave up writing to MLflow at {self.tracking_uri} after {waited:.0f}s "
                   f"({_one_line(exc)}); {lost} metric points were not written; restart the "
                   f"server and resume the sweep")
            self._broken = msg
            self._cv.notify_all()
        _log.error("%s", msg)

    # ------------------------------------------------------------------ store writes (writer thread)
    def _insert_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        assert self._engine is not None and self._fast_stmts is not None
        ins_points, ins_latest = self._fast_stmts
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        for row in rows:
            v = row["value"]
            # MLflow stores NaN as 0 with is_nan, and +-inf as +-max double (SQL has no infinities).
            if math.isnan(v):
                row["value"], row["is_nan"] = 0.0, True
            elif math.isinf(v):
                row["value"] = _MAX_DOUBLE if v > 0 else -_MAX_DOUBLE
            k = (row["run_uuid"], row["key"])
            cur = latest.get(k)
            if cur is None or (row["step"], row["timestamp"], row["value"]) > \
                    (cur["step"], cur["timestamp"], cur["value"]):
                latest[k] = row
        with self._engine.begin() as conn:
            conn.execute(ins_points, list(rows))
            conn.execute(ins_latest, list(latest.values()))

    def _log_batch(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param],
                   tags: Sequence[RunTag]) -> None:
        if not self._is_http:
            self._client.log_batch(run_id, metrics=list(metrics), params=list(params), tags=list(tags),
                                   synchronous=True)
            return
        self._post("/api/2.0/mlflow/runs/log-batch", libcompat.log_batch_body(run_id, metrics, params, tags))

    def _end(self, end: _EndOp) -> None:
        if not self._is_http:
            self._client.set_terminated(end.run_id, end.status, end.end_time_ms)
            return
        self._post("/api/2.0/mlflow/runs/update",
                   libcompat.update_run_body(end.run_id, end.status, end.end_time_ms))

    def _post(self, endpoint: str, body: Mapping[str, Any]) -> None:
        libcompat.mlflow_request(self.tracking_uri, endpoint, body, timeout=_HTTP_TIMEOUT_S)
