"""The Tracker: the one object the drivers use. It connects, picks a store, and hands calls to the run book
(identity, resume) and the writer (queue, backoff)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import sqlalchemy as sa
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .. import libcompat
from ..errors import TrackingError
from .common import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    EndOp,
    MetricsOp,
    ParamsOp,
    T,
    TagsOp,
    TrackerStats,
    log,
    metric_name_error,
    now_ms,
    one_line,
)
from .runs import RunBook
from .sqlite_seed import seed_store
from .sqlstore import BULK_DIALECTS, BulkSqlStore
from .stores import ClientStore, RestStore, Store
from .writer import Writer, call_with_retry

_PROBE_TIMEOUT_S = 5
MEMBER_SEP = "#"
"""Separates a group run's id from a member's name in the handle ``start_member`` returns."""


@dataclass
class _Group:
    run_id: str
    members: int
    ended: dict[str, str] = field(default_factory=dict)


class Tracker:
    """Asynchronous MLflow logger: a parent run per sweep, a child run per network.

    Invariants:
        * ``log_metrics``/``log_params``/``set_tags``/``end_run`` only enqueue; they never wait on I/O
          (past ``max_queued`` queued calls they wait for the writer while the store is up, never during an
          outage: then memory grows until ``retry_max_s``). So does ``start_child`` of a new
          network on a bulk SQL store and on a tracking server (the writer creates the run: on a server the
          id returned is a handle until then, see ``run_id``); elsewhere it makes one ``create_run`` call.
        * An ``end_run`` is applied after every point, param and tag of that run enqueued before it; a
          later tag value overwrites an earlier one; a changed param value is rejected by MLflow (reported).
        * A point is either written or counted as lost and reported by a ``TrackingError`` from
          ``flush``/``close``. Transient failures (server down, database locked) are retried with capped
          exponential backoff until ``retry_max_s`` passes without a successful write; then the tracker is
          broken and every later call raises ``TrackingError``.
        * Retried writes are idempotent (same timestamps; MLflow ignores exact duplicate points).
        * ``start_parent``/``start_child`` are idempotent per sweep key / network key, so a resumed sweep
          continues its runs instead of creating new ones.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, flush_interval_s: float = 0.5,
                 max_batch: int = 1000, retry_max_s: float = 600.0, max_queued: int = 20_000,
                 fast_sql: bool | None = None,
                 artifact_location: str | None = None, experiment_tags: Mapping[str, str] | None = None) -> None:
        """Connect (fail fast if unreachable), create/get ``experiment`` and start the writer thread.

        ``max_queued``: calls wait for the writer once this many are queued while the store is up (bounded
        memory when the store is slower than the workers; never during an outage).
        ``fast_sql``: bulk SQL writes into a SQLite/PostgreSQL store (default: on for those; False forces
        MlflowClient). ``artifact_location`` for a newly created experiment; for SQLite stores it defaults to
        ``mlartifacts/`` next to the database file instead of MLflow's ``./mlruns`` in the current directory.
        ``experiment_tags`` are set on a newly created experiment (e.g. its description,
        ``mlflow.note.content``); every experiment gets the model-training kind tag unless it has a kind.
        """
        if flush_interval_s <= 0 or max_batch <= 0 or retry_max_s < 0 or max_queued <= 0:
            raise ValueError("flush_interval_s, max_batch and max_queued must be > 0 and retry_max_s >= 0")
        self.tracking_uri = tracking_uri
        self._retry_max_s = retry_max_s
        scheme = urlparse(tracking_uri).scheme.lower()
        is_http = scheme in ("http", "https")
        self._is_sqlite = scheme == "sqlite"
        dialect = scheme.split("+")[0]
        if fast_sql and dialect not in BULK_DIALECTS:
            raise ValueError(f"fast_sql needs a sqlite:// or postgresql:// tracking URI, got {tracking_uri}")
        if is_http:
            self._probe_http()
        elif self._is_sqlite:
            self._prepare_sqlite_path()
        self._client = MlflowClient(tracking_uri=tracking_uri)
        try:
            exp = self._get_or_create_experiment(experiment, artifact_location, dict(experiment_tags or {}))
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"cannot use MLflow store at {tracking_uri}: {one_line(exc)}; check the URI "
                                f"or pass --tracking-uri sqlite:///<dir>/mlflow.db") from exc
        self.experiment_id = str(exp.experiment_id)
        self.experiment_name = experiment
        self._valid_keys: set[str] = set()
        self._groups: dict[str, _Group] = {}  # group run id -> members and their ends (group granularity)
        self._groups_lock = threading.Lock()

        store: Store = RestStore(tracking_uri, self.experiment_id) if is_http else ClientStore(self._client)
        bulk: BulkSqlStore | None = None
        if dialect in BULK_DIALECTS and fast_sql is not False:
            bulk = BulkSqlStore.open(tracking_uri, self._is_sqlite, ClientStore(self._client),
                                     lambda run_id: self._runs.owned(run_id), self.experiment_id,
                                     str(exp.artifact_location))
        self._writer = Writer(bulk or store, tracking_uri, flush_interval_s=flush_interval_s, max_batch=max_batch,
                              retry_max_s=retry_max_s, max_queued=max_queued,
                              on_ended=lambda run_ids: self._runs.ended(run_ids))
        self._runs = RunBook(self._client, self.experiment_id, self._writer, self._call)

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
                                f"{one_line(exc)}; start it (mlflow server ...) or pass "
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
        seed_store(db)

    def _get_or_create_experiment(self, name: str, artifact_location: str | None, tags: dict[str, str]) -> Any:
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            if artifact_location is None and self._is_sqlite and (db := self._sqlite_path()) is not None:
                artifact_location = (db.parent.resolve() / "mlartifacts").as_uri()
            try:
                exp_id = self._client.create_experiment(
                    name, artifact_location=artifact_location,
                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, **tags})
                return self._client.get_experiment(exp_id)
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
        return exp

    @property
    def uses_fast_sql(self) -> bool:
        """True when owned runs are created and written by bulk SQL rather than through MlflowClient."""
        return isinstance(self._writer.store, BulkSqlStore)

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a synchronous MLflow call, retrying outages like the writer does."""
        self._writer.check_usable()
        return call_with_retry(what, fn, retry_max_s=self._retry_max_s, tracking_uri=self.tracking_uri)

    # ------------------------------------------------------------------ runs
    def start_parent(self, run_name: str, params: Mapping[str, object], tags: Mapping[str, str]) -> str:
        """Create the sweep's parent run, or reuse the one tagged with the same ``mfsweep.sweep_key``."""
        return self._runs.start_parent(run_name, params, tags)

    def start_child(self, parent_id: str, key: str, run_name: str, params: Mapping[str, object],
                    tags: Mapping[str, str]) -> str:
        """The child run of network ``key`` under ``parent_id``: new, or the one a previous session made.

        A new run's id is returned at once on a bulk SQL store (the writer creates the run, its tags and
        params in bulk); on a tracking server a handle is (the writer creates the run, a few requests at a
        time; ``run_id`` gives MLflow's id). Either way the tracker's calls take it at once, and every write
        of the run follows its creation. A param/tag name or value MLflow would reject raises ValueError here.
        On reuse the run is set back to RUNNING and, for each metric, the largest step already stored is read
        (``stored_steps``): the ledger (orchestrator/ledger.py) sends no point at or below it, so a resumed
        sweep never stores a point twice.
        """
        return self._runs.start_child(parent_id, key, run_name, params, tags)

    def start_member(self, parent_id: str, group_key: str, group_name: str, member: str, members: int,
                     params: Mapping[str, object], tags: Mapping[str, str]) -> str:
        """Group granularity (``tracking.runs: group``): one child run per group (e.g. variant x width) holds
        the curves of its ``members`` networks (e.g. seeds) as metric keys ``<member>/<key>``.

        Returns a handle for ``log_metrics``/``set_tags``/``end_run`` of this member: its metric and tag keys
        get the ``<member>/`` prefix; the group run is created (or reused, like ``start_child``) with
        ``params``/``tags`` at its first member, and ends when all ``members`` members ended: FAILED if one
        failed, else KILLED if one was, else FINISHED.
        """
        why = metric_name_error(member) if member and MEMBER_SEP not in member else f"not empty, no {MEMBER_SEP!r}"
        if why is not None or members < 1:
            raise ValueError(f"invalid group member {member!r} of {members}: {why or 'members must be >= 1'}")
        with self._groups_lock:
            run_id = self._runs.known_child(parent_id, group_key)
            if run_id is None or run_id not in self._groups:
                run_id = self._runs.start_child(parent_id, group_key, group_name, params,
                                                {**tags, "mfsweep.members": str(members)})
                self._groups[run_id] = _Group(run_id, members)
        return f"{run_id}{MEMBER_SEP}{member}"

    def stored_steps(self, run_id: str) -> Mapping[str, int]:
        """Largest step stored per metric when ``run_id`` was reused (empty for new runs); for a member
        handle, its own metrics (keys without the member prefix)."""
        if MEMBER_SEP in run_id:
            rid, member = run_id.split(MEMBER_SEP, 1)
            prefix = f"{member}/"
            return {k.removeprefix(prefix): v for k, v in self._runs.stored_steps(rid).items()
                    if k.startswith(prefix)}
        return self._runs.stored_steps(run_id)

    @staticmethod
    def _member(run_id: str, items: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """(run id, keys with the member's prefix) for a member handle; unchanged for a run id."""
        if MEMBER_SEP not in run_id:
            return run_id, dict(items)
        rid, member = run_id.split(MEMBER_SEP, 1)
        return rid, {f"{member}/{k}": v for k, v in items.items()}

    # ------------------------------------------------------------------ enqueue
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """Enqueue one point per metric at ``step``. NaN and +-inf are allowed."""
        run_id, values = self._member(run_id, {str(k): float(v) for k, v in metrics.items()})
        for k in values:
            if k not in self._valid_keys:
                why = metric_name_error(k)
                if why is not None:
                    raise ValueError(f"invalid MLflow metric name {k!r}: {why}")
                self._valid_keys.add(k)
        if not values:
            return
        ts = now_ms() if timestamp_ms is None else int(timestamp_ms)
        self._writer.enqueue(MetricsOp(run_id, values, int(step), ts), len(values))

    def log_params(self, run_id: str, params: Mapping[str, object]) -> None:
        """Enqueue params (stringified). Re-logging a param with the same value is allowed."""
        if params:
            self._writer.enqueue(ParamsOp(run_id, {str(k): str(v) for k, v in params.items()}))

    def set_tags(self, run_id: str, tags: Mapping[str, object]) -> None:
        """Enqueue tags (stringified); a later value overwrites an earlier one."""
        if tags:
            run_id, str_tags = self._member(run_id, {str(k): str(v) for k, v in tags.items()})
            self._writer.enqueue(TagsOp(run_id, str_tags))

    def end_run(self, run_id: str, status: str = "FINISHED", *, release: bool = False) -> None:
        """Enqueue the run's end; applied after everything enqueued for it before.

        ``release``: the caller is done with this child run (or member) for the session and will not start its
        key again; the tracker then forgets the run once its end is stored, so its memory is bounded by the
        runs in flight, not by the sweep's size (a start of the same key later in the session would make a
        new run). A group run is released with its last member's end.
        """
        if status not in ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"unknown MLflow run status {status!r}; use FINISHED, FAILED or KILLED")
        if MEMBER_SEP in run_id:  # a group member: the group run ends with its last member
            rid, member = run_id.split(MEMBER_SEP, 1)
            with self._groups_lock:
                group = self._groups[rid]
                group.ended[member] = status
                if len(group.ended) < group.members:
                    return
                ends = set(group.ended.values())
                if release:
                    del self._groups[rid]
            status = next((s for s in ("FAILED", "KILLED") if s in ends), "FINISHED")
            run_id = rid
        if release:  # before the end is queued: the writer may store it at once
            self._runs.release(run_id)
        self._writer.enqueue(EndOp(run_id, status, now_ms()))

    def run_id(self, run_id: str) -> str:
        """MLflow's run id of a run (or of a member's group run) this tracker returned. On a tracking server a
        new child run's id is a session-local handle until the writer has created the run: this waits for
        that (and for the run's queued writes). Elsewhere it is the id itself."""
        return self._runs.mlflow_id(run_id.split(MEMBER_SEP, 1)[0])

    # ------------------------------------------------------------------ artifacts (synchronous)
    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file now (retrying outages); the run's queued creation is written first."""
        local = str(path)
        rid = self.run_id(run_id)
        self._call(f"upload {Path(local).name}", lambda: self._client.log_artifact(rid, local, artifact_path))

    def log_dict(self, run_id: str, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Store a JSON/YAML artifact (format from the file extension)."""
        data = dict(dictionary)
        rid = self.run_id(run_id)
        self._call(f"upload {artifact_file}", lambda: self._client.log_dict(rid, data, artifact_file))

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """Store a matplotlib figure as an image artifact."""
        rid = self.run_id(run_id)
        self._call(f"upload {artifact_file}", lambda: self._client.log_figure(rid, figure, artifact_file))

    # ------------------------------------------------------------------ flush / close / stats
    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything enqueued so far is written; raise TrackingError on loss or timeout."""
        self._writer.flush(timeout)

    def close(self) -> None:
        """Flush, stop the writer thread and release connections; raise TrackingError on loss."""
        self._writer.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not mask the exception already propagating
            self.close()
        except TrackingError as err:
            log.error("%s", err)

    @property
    def runs_held(self) -> int:
        """Runs (and groups) this tracker keeps in memory: those in flight, plus any not released."""
        with self._groups_lock:
            return self._runs.held + len(self._groups)

    @property
    def stats(self) -> TrackerStats:
        return self._writer.stats
