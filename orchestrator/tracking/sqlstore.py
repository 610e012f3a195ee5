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
  +-max double);
* run ends: one ``UPDATE runs`` for all of them.

Params logged after creation go through ``MlflowClient.log_batch`` (MLflow must see and reject a changed
value), and so does everything for runs the tracker does not own.

The guard: only on a store whose schema revision (``alembic_version``) is one this code was tested with and
whose reflected tables have exactly the expected columns and primary keys; anything else is written through
MlflowClient with a notice. tests/orchestrator/test_tracking.py reads every write back through MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from .common import RUN_NAME_TAG, USER_TAG, CreateOp, MetricsOp, Segment, Step, chunks, log, one_line
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
_METRIC_COLS = {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}
_KV_COLS = {"key", "value", "run_uuid"}
_RUN_COLS = {"run_uuid", "name", "source_type", "source_name", "entry_point_name", "user_id", "status", "start_time",
             "end_time", "source_version", "lifecycle_stage", "artifact_uri", "experiment_id", "deleted_time"}
# Field limits of MLflow's validation (mlflow.utils.validation): PostgreSQL would reject a longer value and
# with it the whole bulk statement, so longer input is refused at the call instead.
MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000


class BulkSqlStore:
    """Bulk SQL for owned runs, :class:`ClientStore` for the rest (see the module docstring)."""

    name = "bulk-sql"
    creates_runs = True

    def __init__(self, engine: sa.Engine, tables: dict[str, sa.Table], fallback: ClientStore,
                 owned: Callable[[str], bool], experiment_id: str, artifact_location: str) -> None:
        self._engine = engine
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
            steps.append(Step(f"{len(part)} tags", 0, partial(self._write, self._ins_tags, part)))
        steps += self._point_steps(own_points)
        own_ends = [e for e in seg.ends.values() if self._owned(e.run_id)]
        if own_ends:
            rows: list[dict[str, Any]] = [{"b_run": e.run_id, "b_status": e.status, "b_end": e.end_time_ms}
                                          for e in own_ends]
            for part in chunks(rows, _SQL_ROWS_PER_TXN):
                steps.append(Step(f"end of {len(part)} runs", 0, partial(self._write, self._end_runs, part)))
        steps += self._fallback.plan_runs(seg, {}, {}, [], [e for e in seg.ends.values()
                                                            if not self._owned(e.run_id)])
        return steps

    def _point_steps(self, ops: Sequence[MetricsOp]) -> list[Step]:
        rows = [{"key": k, "value": v, "timestamp": op.timestamp_ms, "step": op.step, "run_uuid": op.run_id,
                 "is_nan": False} for op in ops for k, v in op.metrics.items()]
        return [Step(f"{len(part)} metric points", len(part), partial(self._insert_points, part))
                for part in chunks(rows, _SQL_ROWS_PER_TXN)]

    # ------------------------------------------------------------------ writes (writer thread)
    def _create(self, creates: Sequence[CreateOp]) -> None:
        runs: list[dict[str, Any]] = []
        tags: list[dict[str, Any]] = []
        params: list[dict[str, Any]] = []
        for c in creates:
            runs.append({"run_uuid": c.run_id, "name": c.name, "source_type": "UNKNOWN", "source_name": "",
                         "entry_point_name": "", "user_id": c.tags.get(USER_TAG, "unknown"), "status": "RUNNING",
                         "start_time": c.start_ms, "end_time": None, "source_version": "",
                         "lifecycle_stage": "active", "artifact_uri": self.artifact_uri(c.run_id),
                         "experiment_id": self._experiment_id, "deleted_time": None})
            tags.extend({"key": k, "value": v, "run_uuid": c.run_id}
                        for k, v in {**c.tags, RUN_NAME_TAG: c.name}.items())
            params.extend({"key": k, "value": v, "run_uuid": c.run_id} for k, v in c.params.items())
        with self._engine.begin() as conn:
            conn.execute(self._ins_runs, runs)
            conn.execute(self._ins_tags, tags)
            if params:
                conn.execute(self._ins_params, params)

    def _write(self, stmt: Any, rows: Sequence[dict[str, Any]]) -> None:
        with self._engine.begin() as conn:
            conn.execute(stmt, list(rows))

    def _insert_points(self, rows: Sequence[dict[str, Any]]) -> None:
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
            conn.execute(self._ins_points, list(rows))
            conn.execute(self._ins_latest, list(latest.values()))

    def close(self) -> None:
        self._engine.dispose()
