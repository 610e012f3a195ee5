"""The write back-ends behind one protocol: each turns a write segment into the store calls that apply it.

* :class:`ClientStore`: ``MlflowClient.log_batch`` / ``set_terminated`` (any store MLflow's client opens).
* :class:`RestStore`: an ``http(s)://`` tracking server through ``runs/create``, ``runs/search``,
  ``runs/log-batch`` and ``runs/update`` with MLflow's own request code but without its multi-minute retry
  loop (the writer's backoff replaces it, so a restarted server is picked up within seconds); reached only
  through :mod:`orchestrator.libcompat`. The server picks run ids, so a new run gets a session-local handle at
  once and the writer creates it (a few requests in flight together: see ``Step.wave``), mapping the handle
  to the server's id before any other write of that run.
* :class:`~orchestrator.tracking.sqlstore.BulkSqlStore`: guarded bulk SQL into SQLite/PostgreSQL stores.

Per run, one ``log_batch`` call carries its tags with its first metrics (MLflow's limits per call: 1000 metrics,
100 params, 100 tags); params go in calls of their own, so a rejected (changed) param takes nothing with it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from .. import libcompat
from .common import (
    CHILD_KEY_TAG,
    MAX_METRICS_PER_CALL,
    MAX_PARAMS_TAGS_PER_CALL,
    PARENT_TAG,
    RUN_NAME_TAG,
    USER_TAG,
    CreateOp,
    EndOp,
    Segment,
    Step,
    quote,
)

_HTTP_TIMEOUT_S = 60
PENDING_PREFIX = "pending-"
"""Starts a RestStore's handle for a run not created yet (never an MLflow run id: MLflow rejects it)."""


class Store(Protocol):
    """A write back-end: the writer thread applies the steps it plans, retrying each through outages."""

    name: str
    creates_runs: bool
    """True when it creates runs queued as CreateOp (the tracker picks their ids); else runs are created
    synchronously through the client."""

    def plan(self, seg: Segment) -> list[Step]:
        """The writes that apply ``seg``: creations, then params/tags, then points, then ends."""
        ...

    def new_run_id(self) -> str:
        """The id (or handle) of a run the writer will create (stores with ``creates_runs``)."""
        ...

    def resolve(self, run_id: str) -> str | None:
        """The MLflow run id of ``run_id`` (itself unless it is a handle); None while not created."""
        ...

    def forget(self, run_id: str) -> None:
        """Nothing more will be written to ``run_id`` this session: drop what is kept about it."""
        ...

    def close(self) -> None:
        ...


class _PerRunStore:
    """log_batch per run (params, tags and points together), then one end call per run."""

    name = "log_batch"
    creates_runs = False
    concurrent = False
    """Whether the per-run requests of a segment may be in flight together (waves)."""

    def log_batch(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param],
                  tags: Sequence[RunTag]) -> None:
        raise NotImplementedError

    def end(self, end: EndOp) -> None:
        raise NotImplementedError

    def plan(self, seg: Segment) -> list[Step]:
        assert not seg.creates, "this store creates runs synchronously"
        return self.plan_runs(seg, seg.params, seg.tags, seg.points, list(seg.ends.values()))

    def new_run_id(self) -> str:
        raise NotImplementedError("this store creates runs synchronously")

    def resolve(self, run_id: str) -> str | None:
        return run_id

    def forget(self, run_id: str) -> None:
        pass  # keeps nothing per run

    def plan_runs(self, seg: Segment, params_of: Mapping[str, Mapping[str, str]],
                  tags_of: Mapping[str, Mapping[str, str]], points: Sequence[Any],
                  ends: Sequence[EndOp]) -> list[Step]:
        per_run: dict[str, list[Metric]] = {}
        for run_id in dict.fromkeys([*params_of, *tags_of]):
            per_run[run_id] = []
        for op in points:
            per_run.setdefault(op.run_id, []).extend(
                Metric(k, v, op.timestamp_ms, op.step) for k, v in op.metrics.items())
        steps: list[Step] = []
        # Points, params and tags of different runs are independent (wave 1); ends follow all of them (wave 2).
        wave, end_wave = (1, 2) if self.concurrent else (None, None)
        for run_id, metrics in per_run.items():
            params = [Param(k, v) for k, v in params_of.get(run_id, {}).items()]
            tags = [RunTag(k, v) for k, v in tags_of.get(run_id, {}).items()]
            # MLflow rejects a whole log_batch over one changed param: params go alone, never with points/tags.
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_CALL):
                steps.append(Step(f"params of run {run_id}", 0, partial(
                    self.log_batch, run_id, [], params[i:i + MAX_PARAMS_TAGS_PER_CALL], []), wave))
            params = []
            n_calls = max(-(-len(metrics) // MAX_METRICS_PER_CALL), -(-len(params) // MAX_PARAMS_TAGS_PER_CALL),
                          -(-len(tags) // MAX_PARAMS_TAGS_PER_CALL))
            for i in range(n_calls):
                m = metrics[i * MAX_METRICS_PER_CALL:(i + 1) * MAX_METRICS_PER_CALL]
                p = params[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL]
                t = tags[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL]
                what = f"metrics of run {run_id}" if m else f"tags of run {run_id}"
                steps.append(Step(what, len(m), partial(self.log_batch, run_id, m, p, t), wave))
        for end in ends:
            steps.append(Step(f"end of run {end.run_id}", 0, partial(self.end, end), end_wave))
        return steps

    def close(self) -> None:
        pass


class ClientStore(_PerRunStore):
    """Any store, through MlflowClient's public calls."""

    name = "client"

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def log_batch(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param],
                  tags: Sequence[RunTag]) -> None:
        self._client.log_batch(run_id, metrics=list(metrics), params=list(params), tags=list(tags),
                               synchronous=True)

    def end(self, end: EndOp) -> None:
        self._client.set_terminated(end.run_id, end.status, end.end_time_ms)


class RestStore(_PerRunStore):
    """A tracking server, one REST request per call and no retries inside (the writer retries); new runs
    created off the caller's path (see the module docstring)."""

    name = "rest"
    creates_runs = True
    concurrent = True

    def __init__(self, tracking_uri: str, experiment_id: str) -> None:
        self._uri = tracking_uri
        self._experiment_id = experiment_id
        self._ids: dict[str, str] = {}  # handle -> the server's run id, once created
        self._tried: set[str] = set()  # handles whose creation was sent at least once
        self._lock = threading.Lock()  # the writer's wave threads create runs concurrently

    def new_run_id(self) -> str:
        return f"{PENDING_PREFIX}{uuid.uuid4().hex}"

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._ids.pop(run_id, None)
            self._tried.discard(run_id)

    def resolve(self, run_id: str) -> str | None:
        if not run_id.startswith(PENDING_PREFIX):
            return run_id
        with self._lock:
            return self._ids.get(run_id)

    def _id(self, run_id: str) -> str:
        return self.resolve(run_id) or run_id  # an uncreated handle: the server answers "not found"

    def plan(self, seg: Segment) -> list[Step]:
        # Creations first, in flight together (wave 0); each run's other writes follow in later waves.
        steps = [Step(f"creation of run {c.run_id}", 0, partial(self._create_one, c), 0) for c in seg.creates]
        return steps + self.plan_runs(seg, seg.params, seg.tags, seg.points, list(seg.ends.values()))

    def _create_one(self, c: CreateOp) -> None:
        """Create the run and log its params; a retry after an answer that never came adopts the run that
        attempt made (found by its network key under its parent) instead of making a second one."""
        with self._lock:
            run_id = self._ids.get(c.run_id)  # set: created, then its params request failed
            retried = c.run_id in self._tried
            self._tried.add(c.run_id)
        if run_id is None:
            run_id = self._find(c) if retried else None  # an earlier attempt may have created it
        if run_id is None:
            tags = [RunTag(k, v) for k, v in {**c.tags, RUN_NAME_TAG: c.name}.items()]
            body = libcompat.create_run_body(self._experiment_id, c.tags.get(USER_TAG, "unknown"), c.start_ms,
                                             tags, c.name)
            resp = self._post("/api/2.0/mlflow/runs/create", body)
            run_id = str(resp.json()["run"]["info"]["run_id"])
        with self._lock:
            self._ids[c.run_id] = run_id
        params = [Param(k, v) for k, v in c.params.items()]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_CALL):  # a retry sends them again: same values
            self.log_batch(run_id, [], params[i:i + MAX_PARAMS_TAGS_PER_CALL], [])

    def _find(self, c: CreateOp) -> str | None:
        """The run a previous attempt created (same network key under the same parent), if any."""
        key, parent = c.tags.get(CHILD_KEY_TAG), c.tags.get(PARENT_TAG)
        if key is None or parent is None:
            return None
        filt = f"tags.`{CHILD_KEY_TAG}` = {quote(key)} and tags.`{PARENT_TAG}` = {quote(parent)}"
        resp = self._post("/api/2.0/mlflow/runs/search",
                          {"experiment_ids": [self._experiment_id], "filter": filt, "max_results": 1,
                           "order_by": ["attributes.start_time ASC"]})
        runs = resp.json().get("runs", [])
        return str(runs[0]["info"]["run_id"]) if runs else None

    def log_batch(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param],
                  tags: Sequence[RunTag]) -> None:
        rid = self._id(run_id)
        self._post("/api/2.0/mlflow/runs/log-batch", libcompat.log_batch_body(rid, metrics, params, tags))

    def end(self, end: EndOp) -> None:
        rid = self._id(end.run_id)
        self._post("/api/2.0/mlflow/runs/update", libcompat.update_run_body(rid, end.status, end.end_time_ms))

    def _post(self, endpoint: str, body: Mapping[str, Any]) -> Any:
        return libcompat.mlflow_request(self._uri, endpoint, body, timeout=_HTTP_TIMEOUT_S)

