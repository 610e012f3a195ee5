"""Guarded bulk SQL writes into MLflow's own tables (SQLite and PostgreSQL stores).

MLflow's ORM-based ``log_batch`` tops out near 8k points/s on SQLite, and its ``create_run`` plus a
``log_batch`` of a network's params cost tens of milliseconds per run; a packed sweep needs more than 10k
points/s and thousands of runs a minute. So for the runs this tracker owns (created or reopened by it) this
store writes with one bulk statement per table and write cycle:

* run creation: ``runs``, ``tags``, ``params`` rows exactly as ``SqlAlchemyStore.create_run`` +
  ``log_batch`` write them (the tracker picks the run id, a uuid4 hex like MLflow's);
* tags: upsert (MLflow's rule: a later value overwrites); ``mlflow.runName`` goes through the client, which
  keeps the run's name column in step;
* metric points: ``metrics`` insert-or-ignore, ``latest_metrics`` upsert keeping the max (step, timestamp,
  value), MLflow's ``_update_latest_metrics_if_necessary`` rule (NaN stored as 0 with is_nan, +-inf as
  +-max double; of equal tuples the first logged stays);
* on PostgreSQL (psycopg 3 or psycopg2) new rows go in by ``COPY`` (:mod:`.pgcopy`; a retried write falls back
  to insert-or-ignore), and ``latest_metrics``, tags and ends by one set-based statement per batch (column
  arrays through ``unnest``) instead of one statement per row;
* run ends: one ``UPDATE runs`` for all of them.

Params logged after creation go through ``MlflowClient.log_batch`` (MLflow must see and reject a changed
value), and so does everything for runs the tracker does not own.

The guard: only on a store whose schema revision (``alembic_version``) is one this code was tested with and
whose reflected tables have exactly the expected columns and primary keys; anything else is written through
MlflowClient with a notice. tests/orchestrator/test_tracking.py reads every write back through MLflow.
"""

from __future__ import annotations

import itertools
import math
import uuid
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .common import RUN_NAME_TAG, USER_TAG, CreateOp, MetricsOp, Segment, Step, chunks, log, one_line
from .pgcopy import copy_rows, supports_copy
from .stores import ClientStore

# MLflow store schema versions (alembic revisions) the bulk SQL path was tested against: MLflow 3.17's head.
# A store at any other revision is written through MlflowClient (a newer MLflow may change how it stores or
# aggregates metrics even where the columns look the same).
TESTED_SCHEMA_REVISIONS = frozenset({"dc11669786a5"})
# Bulk SQL statements are chunked so one write never holds the database (SQLite: file) lock for long.
_SQL_ROWS_PER_TXN = 50_000
_MAX_DOUBLE = 1.7976931348623157e308
# SQL dialects whose INSERT ... ON CONFLICT the bulk path uses.
BULK_DIALECTS: dict[str, Callable[[sa.Table], Any]] = {
    "sqlite": sqlite_insert, "postgresql": postgresql_insert}
# Column orders of the bulk rows (tuples): COPY's column lists and the fallback statements' dict keys.
_METRIC_ORDER = ("key", "value", "timestamp", "step", "is_nan", "run_uuid")
_KV_ORDER = ("key", "value", "run_uuid")
_RUN_ORDER = ("run_uuid", "name", "source_type", "source_name", "entry_point_name", "user_id", "status",
              "start_time", "end_time", "source_version", "lifecycle_stage", "artifact_uri", "experiment_id",
              "deleted_time")
_METRIC_COLS, _KV_COLS, _RUN_COLS = set(_METRIC_ORDER), set(_KV_ORDER), set(_RUN_ORDER)
# Field limits of MLflow's validation (mlflow.utils.validation): PostgreSQL would reject a longer value and
# with it the whole bulk statement, so longer input is refused at the call instead.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_PointRow = tuple[str, float, int, int, bool, str]
# PostgreSQL's types of _METRIC_ORDER, for COPY's binary format (which must match the columns exactly: checked
# against the reflected table by _binary_ready, else the points go in as text).
_METRIC_PG_TYPES = ("varchar", "float8", "int8", "int8", "bool", "varchar")
_METRIC_SA_TYPES = (sa.String, sa.Float, sa.BigInteger, sa.BigInteger, sa.Boolean, sa.String)
# PostgreSQL: metric points written on this many connections at once. bench/tracking.py --postgres, binary
# COPY, on a 2-core machine that also runs the client (2026-12-03): 1 connection 43.8-47.5k points/s, 2:
# 53.4-69.0k, 4: 46.1-63.3k. A database server with cores of its own would take more.
PG_POINT_SHARDS = 2
# PostgreSQL through psycopg 3: metric points in COPY's binary format (pgcopy.py; bench/tracking.py --postgres
# --copy binary,text compares them).
PG_BINARY_COPY = True
# PostgreSQL: latest_metrics in one set-based upsert per batch (one row per run and key, arrays as parameters),
# with MLflow's rule as its WHERE: replace only a strictly smaller (step, timestamp, value).
_UPSERT_LATEST_PG = sa.text(
    'INSERT INTO latest_metrics (key, value, "timestamp", step, is_nan, run_uuid) '
    "SELECT * FROM unnest(CAST(:key AS varchar[]), CAST(:value AS double precision[]), "
    "CAST(:timestamp AS bigint[]), CAST(:step AS bigint[]), CAST(:is_nan AS boolean[]), "
    "CAST(:run_uuid AS varchar[])) "
    'ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value, "timestamp" = EXCLUDED."timestamp", '
    "step = EXCLUDED.step, is_nan = EXCLUDED.is_nan "
    'WHERE (EXCLUDED.step, EXCLUDED."timestamp", EXCLUDED.value) '
    '> (latest_metrics.step, latest_metrics."timestamp", latest_metrics.value)')
# The same for tags (a later value overwrites) and run ends: one statement per batch instead of one per row.
_UPSERT_TAGS_PG = sa.text(
    "INSERT INTO tags (key, value, run_uuid) SELECT * FROM unnest(CAST(:key AS varchar[]), "
    "CAST(:value AS varchar[]), CAST(:run_uuid AS varchar[])) "
    "ON CONFLICT (key, run_uuid) DO UPDATE SET value = EXCLUDED.value")
_END_RUNS_PG = sa.text(
    "UPDATE runs SET status = u.status, end_time = u.end_time FROM unnest(CAST(:b_run AS varchar[]), "
    "CAST(:b_status AS varchar[]), CAST(:b_end AS bigint[])) AS u(run_uuid, status, end_time) "
    "WHERE runs.run_uuid = u.run_uuid")


def _binary_ready(metrics: sa.Table) -> bool:
    """The metrics table's columns have the types _METRIC_PG_TYPES names (a double, not a real, for value)."""
    for name, want in zip(_METRIC_ORDER, _METRIC_SA_TYPES, strict=True):
        got = metrics.c[name].type
        if not isinstance(got, want) or (want is sa.Float and getattr(got, "precision", None) not in (None, 53)):
            return False
    return True


def _point_row(run_id: str, key: str, value: float, timestamp_ms: int, step: int) -> _PointRow:
    """A metrics row as MLflow's ``sanitize_metric_value`` stores it: NaN as 0 with is_nan, +-inf as +-max
    double (SQL has no infinities)."""
    if math.isnan(value):
        return (key, 0.0, timestamp_ms, step, True, run_id)
    if math.isinf(value):
        return (key, _MAX_DOUBLE if value > 0 else -_MAX_DOUBLE, timestamp_ms, step, False, run_id)
    return (key, value, timestamp_ms, step, False, run_id)


class BulkSqlStore:
    """Bulk SQL for owned runs, :class:`ClientStore` for the rest (see the module docstring)."""

    name = "bulk-sql"
    creates_runs = True

    def __init__(self, engine: sa.Engine, tables: dict[str, sa.Table], fallback: ClientStore,
                 owned: Callable[[str], bool], experiment_id: str, artifact_location: str) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self._copy = supports_copy(engine)
        self._metric_types = (_METRIC_PG_TYPES if self._copy and PG_BINARY_COPY and _binary_ready(tables["metrics"])
                              else None)
        self._fallback = fallback
        self._owned = owned
        self._experiment_id = int(experiment_id)
        self._artifacts = artifact_location.rstrip("/")
        insert = BULK_DIALECTS[engine.dialect.name]
        metrics, latest, runs, tags, params = (tables[n] for n in ("metrics", "latest_metrics", "runs", "tags",
                                                                    "params"))
        self._ins_points = insert(metrics).on_conflict_do_nothing()  # exact duplicates: a retried write
        up = insert(latest)
        self._ins_latest = up.on_conflict_do_update(
            index_elements=[latest.c.key, latest.c.run_uuid],
            set_={"value": up.excluded.value, "timestamp": up.excluded.timestamp,
                  "step": up.excluded.step, "is_nan": up.excluded.is_nan},
            where=sa.tuple_(up.excluded.step, up.excluded.timestamp, up.excluded.value)
            > sa.tuple_(latest.c.step, latest.c.timestamp, latest.c.value))
        self._ins_runs = insert(runs).on_conflict_do_nothing()  # a retried creation
        self._ins_params = insert(params).on_conflict_do_nothing()
        tag_up = insert(tags)
        self._ins_tags = tag_up.on_conflict_do_update(index_elements=[tags.c.key, tags.c.run_uuid],
                                                      set_={"value": tag_up.excluded.value})
        self._end_runs = (runs.update().where(runs.c.run_uuid == sa.bindparam("b_run"))
                          .values(status=sa.bindparam("b_status"), end_time=sa.bindparam("b_end")))

    @classmethod
    def open(cls, tracking_uri: str, is_sqlite: bool, fallback: ClientStore, owned: Callable[[str], bool],
             experiment_id: str, artifact_location: str) -> BulkSqlStore | None:
        """The store, or None (with the reason logged) when the schema is not the one this code knows."""
        try:
            # A long busy timeout: the MLflow UI or another writer may hold the SQLite lock briefly.
            connect_args = {"timeout": 60} if is_sqlite else {}
            engine = sa.create_engine(tracking_uri, connect_args=connect_args, pool_pre_ping=True)
            md = sa.MetaData()
            tables = {n: sa.Table(n, md, autoload_with=engine)
                      for n in ("metrics", "latest_metrics", "runs", "tags", "params")}
            with engine.connect() as conn:
                revisions = {str(r) for r in conn.execute(sa.text("SELECT version_num FROM alembic_version"))
                             .scalars()}
        except Exception as exc:
            log.info("MLflow bulk SQL path off (%s); using log_batch", one_line(exc))
            return None
        if not revisions or not revisions <= TESTED_SCHEMA_REVISIONS:
            log.warning("MLflow store schema %s is not one mfsweep's bulk SQL path was tested with; logging "
                        "through MlflowClient (slower)", ",".join(sorted(revisions)) or "unknown")
            engine.dispose()
            return None
        want = {"metrics": (_METRIC_COLS, None), "latest_metrics": (_METRIC_COLS, {"key", "run_uuid"}),
                "runs": (_RUN_COLS, {"run_uuid"}), "tags": (_KV_COLS, {"key", "run_uuid"}),
                "params": (_KV_COLS, {"key", "run_uuid"})}
        for name, (cols, pk) in want.items():
            t = tables[name]
            if {c.name for c in t.c} != cols or (pk is not None and {c.name for c in t.primary_key.columns} != pk):
                log.info("MLflow table %s differs from the known schema; using MlflowClient", name)
                engine.dispose()
                return None
        return cls(engine, tables, fallback, owned, experiment_id, artifact_location)

    def new_run_id(self) -> str:
        return uuid.uuid4().hex  # what MLflow's create_run picks

    def resolve(self, run_id: str) -> str | None:
        return run_id

    def forget(self, run_id: str) -> None:
        pass  # keeps nothing per run (what it owns is the run book's)

    def artifact_uri(self, run_id: str) -> str:
        """Where MLflow's create_run puts a run's artifacts: <experiment location>/<run id>/artifacts."""
        return f"{self._artifacts}/{run_id}/artifacts"

    # ------------------------------------------------------------------ planning
    def plan(self, seg: Segment) -> list[Step]:
        steps: list[Step] = []
        for creates in chunks(seg.creates, _SQL_ROWS_PER_TXN // 32):
            steps.append(Step(f"creation of {len(creates)} runs", 0, partial(self._create, creates)))
        own_tags: list[dict[str, Any]] = []
        other_tags: dict[str, dict[str, str]] = {}
        for run_id, tags in seg.tags.items():
            if self._owned(run_id):
                named = {k: v for k, v in tags.items() if k == RUN_NAME_TAG}
                if named:
                    other_tags[run_id] = named
                own_tags.extend({"key": k, "value": v, "run_uuid": run_id} for k, v in tags.items()
                                if k != RUN_NAME_TAG)
            else:
                other_tags[run_id] = tags
        own_points = [op for op in seg.points if self._owned(op.run_id)]
        other_points = [op for op in seg.points if not self._owned(op.run_id)]
        steps += self._fallback.plan_runs(seg, seg.params, other_tags, other_points, [])
        for part in chunks(own_tags, _SQL_ROWS_PER_TXN):
            steps.append(Step(f"{len(part)} tags", 0, partial(self._write, self._ins_tags, _UPSERT_TAGS_PG, part)))
        steps += self._point_steps(own_points)
        own_ends = [e for e in seg.ends.values() if self._owned(e.run_id)]
        if own_ends:
            rows: list[dict[str, Any]] = [{"b_run": e.run_id, "b_status": e.status, "b_end": e.end_time_ms}
                                          for e in own_ends]
            for part in chunks(rows, _SQL_ROWS_PER_TXN):
                steps.append(Step(f"end of {len(part)} runs", 0,
                                  partial(self._write, self._end_runs, _END_RUNS_PG, part)))
        steps += self._fallback.plan_runs(seg, {}, {}, [], [e for e in seg.ends.values()
                                                            if not self._owned(e.run_id)])
        return steps

    def _point_steps(self, ops: Sequence[MetricsOp]) -> list[Step]:
        """One transaction per chunk of points. On PostgreSQL the points are split by run into
        ``PG_POINT_SHARDS`` shards written concurrently (one wave per chunk index), each on its own connection:
        one backend's index and foreign-key upkeep is the limit, not the client. A run's points stay in one
        shard and in order, so two concurrent transactions never touch the same ``latest_metrics`` row."""
        n = PG_POINT_SHARDS if self._pg else 1
        shards: list[list[_PointRow]] = [[] for _ in range(n)]
        for op in ops:
            shards[zlib.crc32(op.run_id.encode()) % n].extend(
                _point_row(op.run_id, k, v, op.timestamp_ms, op.step) for k, v in op.metrics.items())
        per_shard = [chunks(rows, _SQL_ROWS_PER_TXN // n) for rows in shards]
        return [Step(f"{len(part)} metric points", len(part), partial(self._insert_points, part), wave=i)
                for i, parts in enumerate(itertools.zip_longest(*per_shard)) for part in parts if part]

    # ------------------------------------------------------------------ writes (writer thread)
    def _create(self, creates: Sequence[CreateOp]) -> None:
        runs: list[tuple[Any, ...]] = []
        tags: list[tuple[str, str, str]] = []
        params: list[tuple[str, str, str]] = []
        for c in creates:
            runs.append((c.run_id, c.name, "UNKNOWN", "", "", c.tags.get(USER_TAG, "unknown"), "RUNNING",
                         c.start_ms, None, "", "active", self.artifact_uri(c.run_id), self._experiment_id, None))
            tags.extend((k, v, c.run_id) for k, v in {**c.tags, RUN_NAME_TAG: c.name}.items())
            params.extend((k, v, c.run_id) for k, v in c.params.items())
        with self._engine.begin() as conn:
            self._bulk(conn, "runs", _RUN_ORDER, runs, self._ins_runs)
            self._bulk(conn, "tags", _KV_ORDER, tags, self._ins_tags)
            if params:
                self._bulk(conn, "params", _KV_ORDER, params, self._ins_params)

    def _bulk(self, conn: sa.Connection, table: str, columns: Sequence[str], rows: Sequence[tuple[Any, ...]],
              fallback: Any) -> None:
        """New rows: COPY on PostgreSQL, else (or when some are already there: a retried write) ``fallback``,
        the table's insert-or-ignore / upsert statement."""
        if self._copy and copy_rows(conn, table, columns, rows):
            return
        conn.execute(fallback, [dict(zip(columns, row, strict=True)) for row in rows])

    def _write(self, stmt: Any, pg_stmt: sa.TextClause, rows: Sequence[dict[str, Any]]) -> None:
        """``stmt`` once per row, or on PostgreSQL ``pg_stmt`` once with a column array per parameter."""
        with self._engine.begin() as conn:
            if self._pg:
                conn.execute(pg_stmt, {k: [r[k] for r in rows] for k in rows[0]})
            else:
                conn.execute(stmt, list(rows))

    def _insert_points(self, rows: Sequence[_PointRow]) -> None:
        # MLflow's rule per (run, key), in arrival order: a point replaces the latest one only when its
        # (step, timestamp, value) is strictly greater (NaN compares as its stored 0), so of equal ones the
        # first stays. Applied here within the batch, and by the upsert's WHERE against what is stored.
        latest: dict[tuple[str, str], _PointRow] = {}
        for row in rows:
            k = (row[5], row[0])
            cur = latest.get(k)
            if cur is None or (row[3], row[2], row[1]) > (cur[3], cur[2], cur[1]):
                latest[k] = row
        with self._engine.begin() as conn:
            if self._copy:
                # Exact duplicates in one COPY would fail it: MLflow keeps one of them too.
                unique = list(dict.fromkeys(rows))
                # Sorted by run, key, step: the metrics indexes (run_uuid; run_uuid, key, step) fill page by page.
                unique.sort(key=lambda r: (r[5], r[0], r[3]))
                if not copy_rows(conn, "metrics", _METRIC_ORDER, unique, self._metric_types):
                    conn.execute(self._ins_points, [dict(zip(_METRIC_ORDER, r, strict=True)) for r in unique])
            else:
                conn.execute(self._ins_points, [dict(zip(_METRIC_ORDER, r, strict=True)) for r in rows])
            if self._pg:
                cols = zip(*latest.values(), strict=True)
                conn.execute(_UPSERT_LATEST_PG, dict(zip(_METRIC_ORDER, map(list, cols), strict=True)))
            else:
                conn.execute(self._ins_latest, [dict(zip(_METRIC_ORDER, r, strict=True)) for r in latest.values()])

    def close(self) -> None:
        self._engine.dispose()
