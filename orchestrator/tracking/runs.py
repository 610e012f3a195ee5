"""Run identity and resume: a sweep's parent run is found by its ``mfsweep.sweep_key`` tag, a network's child
run by its ``mfsweep.key`` tag under that parent, so a resumed sweep continues its runs instead of creating
new ones; a reused run remembers the last step stored per metric (``stored_steps``: the ledger sends no point
at or below it).

New child runs cost the caller no I/O where the writer creates them: on bulk SQL the id is a uuid4 hex like
MLflow's and the writer creates the runs in bulk; on a tracking server (which picks ids) it is a session-local
handle the writer maps to the server's id when it has created the run (``mlflow_id`` waits for that). A run
identity that outlives the session is always MLflow's id, found again by its tags. Elsewhere (an untested
schema, ``fast_sql=False``) ``create_run`` is one synchronous call and the params follow through the queue."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import ViewType

from ..errors import TrackingError
from .common import (
    CHILD_KEY_TAG,
    PARENT_TAG,
    RUN_NAME_TAG,
    SWEEP_KEY_TAG,
    CreateOp,
    ParamsOp,
    TagsOp,
    log,
    metric_name_error,
    now_ms,
    quote,
)
from .sqlstore import MAX_KEY_LENGTH, MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH
from .writer import Writer


def _checked(kind: str, items: Mapping[str, object], max_value: int) -> dict[str, str]:
    """Stringified params or tags; a name or value MLflow would reject is a ValueError at the call."""
    out = {str(k): str(v) for k, v in items.items()}
    for k, v in out.items():
        why = metric_name_error(k) if len(k) <= MAX_KEY_LENGTH else f"longer than {MAX_KEY_LENGTH} characters"
        if why is not None:
            raise ValueError(f"invalid MLflow {kind} name {k!r}: {why}")
        if len(v) > max_value:
            raise ValueError(f"MLflow {kind} {k!r} is {len(v)} characters long, more than MLflow's {max_value}")
    return out


class RunBook:
    """Which MLflow run stands for which sweep / network, and what a reused run already holds."""

    def __init__(self, client: MlflowClient, experiment_id: str, writer: Writer,
                 call: Callable[[str, Callable[[], Any]], Any]) -> None:
        self._client = client
        self._experiment_id = experiment_id
        self._writer = writer
        self._call = call
        self._lock = threading.RLock()  # start_* may be called from several threads
        self._fresh_parents: set[str] = set()
        self._children: dict[str, dict[str, str]] = {}  # parent -> network key -> run id
        # Runs started here (the only ones the bulk SQL path writes to) -> a child's (parent, key).
        self._own: dict[str, tuple[str, str] | None] = {}
        self._floors: dict[str, dict[str, int]] = {}  # run -> metric key -> max step already stored
        self._releasing: set[str] = set()  # ended with release: forgotten once the end is stored
        self._ended: collections.deque[str] = collections.deque()  # ends the writer stored (thread-safe appends)

    def owned(self, run_id: str) -> bool:
        return run_id in self._own

    @property
    def held(self) -> int:
        """Runs this session keeps an identity of (a released run is dropped once its end is stored)."""
        with self._lock:
            self._forget_ended()
            return len(self._own)

    def known_child(self, parent_id: str, key: str) -> str | None:
        """The run of ``key`` if this session started it already."""
        with self._lock:
            return self._children.get(parent_id, {}).get(key)

    def stored_steps(self, run_id: str) -> Mapping[str, int]:
        return dict(self._floors.get(run_id, {}))

    def _find_runs(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token: str | None = None
        while True:
            page = self._client.search_runs([self._experiment_id], filter_string=filter_string,
                                            run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                            order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def start_parent(self, run_name: str, params: Mapping[str, object], tags: Mapping[str, str]) -> str:
        with self._lock:
            str_tags = {k: str(v) for k, v in tags.items()}
            sweep_key = str_tags.get(SWEEP_KEY_TAG)
            run_id: str | None = None
            if sweep_key is not None:
                found = self._call("search for the sweep's parent run", lambda: self._find_runs(
                    f"tags.`{SWEEP_KEY_TAG}` = {quote(sweep_key)}"))
                if len(found) > 1:
                    log.warning("%d MLflow runs carry %s=%s; reusing the oldest", len(found), SWEEP_KEY_TAG,
                                sweep_key)
                if found:
                    run_id = str(found[0].info.run_id)
                    rid = run_id
                    self._call("reopen the parent run", lambda: self._client.update_run(rid, status="RUNNING"))
            if run_id is None:
                run = self._call("create the parent run", lambda: self._client.create_run(
                    self._experiment_id, tags=str_tags, run_name=run_name))
                run_id = str(run.info.run_id)
                self._fresh_parents.add(run_id)
            self._own[run_id] = None
            if str_tags:
                self._writer.enqueue(TagsOp(run_id, str_tags))
            if params:
                self._writer.enqueue(ParamsOp(run_id, {str(k): str(v) for k, v in params.items()}))
            return run_id

    def start_child(self, parent_id: str, key: str, run_name: str, params: Mapping[str, object],
                    tags: Mapping[str, str]) -> str:
        str_params = _checked("param", params, MAX_PARAM_VALUE_LENGTH)
        str_tags = {**_checked("tag", tags, MAX_TAG_VALUE_LENGTH), CHILD_KEY_TAG: key, PARENT_TAG: parent_id}
        name = str_tags.pop(RUN_NAME_TAG, None) or run_name
        if len(name) > MAX_KEY_LENGTH:
            raise ValueError(f"MLflow run name {name[:40]!r}... is longer than {MAX_KEY_LENGTH} characters")
        with self._lock:
            self._forget_ended()
            children = self._children.get(parent_id)
            if children is None:
                children = {}
                if parent_id not in self._fresh_parents:
                    found = self._call("list the sweep's child runs", lambda: self._find_runs(
                        f"tags.`{PARENT_TAG}` = {quote(parent_id)}"))
                    for r in found:
                        k = r.data.tags.get(CHILD_KEY_TAG)
                        if k is not None:
                            children.setdefault(k, str(r.info.run_id))
                self._children[parent_id] = children
            run_id = children.get(key)
            if run_id is None:
                if self._writer.store.creates_runs:  # no I/O here: the writer creates it with its params
                    run_id = self._writer.store.new_run_id()
                    self._own[run_id] = (parent_id, key)
                    children[key] = run_id
                    self._writer.enqueue(CreateOp(run_id, name, str_tags, str_params, now_ms()))
                    return run_id
                run = self._call(f"create child run {key}", lambda: self._client.create_run(
                    self._experiment_id, tags={**str_tags, RUN_NAME_TAG: name}, run_name=name))
                run_id = str(run.info.run_id)
                children[key] = run_id
            else:
                rid = self.mlflow_id(run_id)  # reused within this session: its queued points must be visible
                self._floors[run_id] = self._stored_steps(rid)
                self._call(f"reopen child run {key}", lambda: self._client.update_run(rid, status="RUNNING"))
                self._writer.enqueue(TagsOp(run_id, str_tags))
            self._own[run_id] = (parent_id, key)
            if str_params:
                self._writer.enqueue(ParamsOp(run_id, str_params))
            return run_id

    def release(self, run_id: str) -> None:
        """The caller is done with this child run for the session (it will not start its key again): forget
        it once its end is stored (:meth:`ended`), so memory is bounded by the runs in flight."""
        with self._lock:
            if self._own.get(run_id) is not None:
                self._releasing.add(run_id)

    def ended(self, run_ids: Iterable[str]) -> None:
        """The writer stored these runs' ends (and, before them, every write queued for them). Called on the
        writer thread, which must not take the lock (a caller holding it may be waiting for the writer): the
        runs are forgotten at the next start or count."""
        self._ended.extend(run_ids)

    def _forget_ended(self) -> None:
        """Under the lock: forget the released runs whose ends were stored."""
        while self._ended:
            run_id = self._ended.popleft()
            if run_id not in self._releasing:
                continue
            self._releasing.discard(run_id)
            owner = self._own.pop(run_id, None)
            if owner is not None:
                children = self._children.get(owner[0], {})
                if children.get(owner[1]) == run_id:
                    del children[owner[1]]
            self._floors.pop(run_id, None)
            self._writer.store.forget(run_id)

    def mlflow_id(self, run_id: str) -> str:
        """MLflow's id of a run this session started (a handle until the writer created it: waits for that
        and for the run's queued writes), or ``run_id`` itself."""
        if run_id in self._own:
            self._writer.flush()
        rid = self._writer.store.resolve(run_id)
        if rid is None:
            raise TrackingError(f"MLflow run {run_id} was not created (see the errors reported before)")
        return rid

    def _stored_steps(self, run_id: str) -> dict[str, int]:
        run = self._call("read a reused run", lambda: self._client.get_run(run_id))
        floors: dict[str, int] = {}
        for metric_key in run.data.metrics:
            hist = self._call("read a metric history", partial(self._client.get_metric_history, run_id, metric_key))
            if hist:
                floors[metric_key] = max(int(m.step) for m in hist)
        return floors

