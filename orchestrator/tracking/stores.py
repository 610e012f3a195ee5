"""The write back-ends behind one protocol: each turns a write segment into the store calls that apply it.

* :class:`ClientStore`: ``MlflowClient.log_batch`` / ``set_terminated`` (any store MLflow's client opens).
* :class:`RestStore`: an ``http(s)://`` tracking server through ``runs/log-batch`` and ``runs/update`` with
  MLflow's own request code but without its multi-minute retry loop (the writer's backoff replaces it, so a
  restarted server is picked up within seconds); reached only through :mod:`orchestrator.libcompat`.
* :class:`~orchestrator.tracking.sqlstore.BulkSqlStore`: guarded bulk SQL into SQLite/PostgreSQL stores.

Per run, one ``log_batch`` call carries its tags with its first metrics (MLflow's limits per call: 1000 metrics,
100 params, 100 tags); params go in calls of their own, so a rejected (changed) param takes nothing with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from .. import libcompat
from .common import (
    MAX_METRICS_PER_CALL,
    MAX_PARAMS_TAGS_PER_CALL,
    EndOp,
    Segment,
    Step,
)

_HTTP_TIMEOUT_S = 60


class Store(Protocol):
    """A write back-end: the writer thread applies the steps it plans, retrying each through outages."""

    name: str
    creates_runs: bool
    """True when it creates runs queued as CreateOp (the tracker picks their ids); else runs are created
    synchronously through the client."""

    def plan(self, seg: Segment) -> list[Step]:
        """The writes that apply ``seg``: creations, then params/tags, then points, then ends."""
        ...

    def close(self) -> None:
        ...


class _PerRunStore:
    """log_batch per run (params, tags and points together), then one end call per run."""

    name = "log_batch"
    creates_runs = False

    def log_batch(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param],
                  tags: Sequence[RunTag]) -> None:
        raise NotImplementedError

    def end(self, end: EndOp) -> None:
        raise NotImplementedError

    def plan(self, seg: Segment) -> list[Step]:
        assert not seg.creates, "this store creates runs synchronously"
        return self.plan_runs(seg, seg.params, seg.tags, seg.points, list(seg.ends.values()))

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
        for run_id, metrics in per_run.items():
            params = [Param(k, v) for k, v in params_of.get(run_id, {}).items()]
            tags = [RunTag(k, v) for k, v in tags_of.get(run_id, {}).items()]
            # MLflow rejects a whole log_batch over one changed param: params go alone, never with points/tags.
            for i in range(0, len(params), MAX_PARAMS_TAGS_PER_CALL):
                steps.append(Step(f"params of run {run_id}", 0, partial(
                    self.log_batch, run_id, [], params[i:i + MAX_PARAMS_TAGS_PER_CALL], [])))
            params = []
            n_calls = max(-(-len(metrics) // MAX_METRICS_PER_CALL), -(-len(params) // MAX_PARAMS_TAGS_PER_CALL),
                          -(-len(tags) // MAX_PARAMS_TAGS_PER_CALL))
            for i in range(n_calls):
                m = metrics[i * MAX_METRICS_PER_CALL:(i + 1) * MAX_METRICS_PER_CALL]
                p = params[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL]
                t = tags[i * MAX_PARAMS_TAGS_PER_CALL:(i + 1) * MAX_PARAMS_TAGS_PER_CALL]
                what = f"metrics of run {run_id}" if m else f"tags of run {run_id}"
                steps.append(Step(what, len(m), partial(self.log_batch, run_id, m, p, t)))
        for end in ends:
            steps.append(Step(f"end of run {end.run_id}", 0, partial(self.end, end)))
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
    """A tracking server, one REST request per call and no retries inside (the writer retries)."""

    name = "rest"

    def __init__(self, tracking_uri: str) -> None:
        self._uri = tracking_uri

    def log_batch(self, run_id: str, metrics: Sequence[Metric], params: Sequence[Param],
                  tags: Sequence[RunTag]) -> None:
        self._post("/api/2.0/mlflow/runs/log-batch", libcompat.log_batch_body(run_id, metrics, params, tags))

    def end(self, end: EndOp) -> None:
        self._post("/api/2.0/mlflow/runs/update",
                   libcompat.update_run_body(end.run_id, end.status, end.end_time_ms))

    def _post(self, endpoint: str, body: Mapping[str, Any]) -> None:
        libcompat.mlflow_request(self._uri, endpoint, body, timeout=_HTTP_TIMEOUT_S)
