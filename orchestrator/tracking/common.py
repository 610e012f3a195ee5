"""What every part of the tracker shares: the queued operations, their grouping into write segments, the
write steps a store makes of them, counters, and the rules for errors and names."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import sqlalchemy as sa
from mlflow.exceptions import MlflowException

log = logging.getLogger("orchestrator.tracking")
T = TypeVar("T")

SWEEP_KEY_TAG = "mfsweep.sweep_key"
# MLflow 3's UI opens an experiment without this tag as a GenAI one (traces, tokens, latency); a sweep's
# experiment holds training runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
CHILD_KEY_TAG = "mfsweep.key"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
USER_TAG = "mlflow.user"

# MLflow's log_batch limits (mlflow.utils.validation): per call <= 1000 metrics, <= 100 params, <= 100 tags.
MAX_METRICS_PER_CALL = 1000
MAX_PARAMS_TAGS_PER_CALL = 100
BACKOFF_FIRST_S = 0.2
BACKOFF_CAP_S = 3.0
# MlflowException codes that retrying cannot fix (bad input, missing run, auth); everything else is treated
# as an outage (connection errors, 5xx, "database is locked").
_PERMANENT_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "ENDPOINT_NOT_FOUND",
    "FEATURE_DISABLED", "MALFORMED_REQUEST",
})


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
    points_lost: int
    """Points that could not be written (reported through TrackingError)."""


# ---------------------------------------------------------------------------------------- queued operations
class CreateOp(NamedTuple):
    """A run whose id the tracker chose (stores that let it: bulk SQL), created by the writer."""

    run_id: str
    name: str
    tags: dict[str, str]
    params: dict[str, str]
    start_ms: int


class MetricsOp(NamedTuple):
    run_id: str
    metrics: dict[str, float]
    step: int
    timestamp_ms: int


class ParamsOp(NamedTuple):
    run_id: str
    params: dict[str, str]


class TagsOp(NamedTuple):
    run_id: str
    tags: dict[str, str]


class EndOp(NamedTuple):
    run_id: str
    status: str
    end_time_ms: int


Op = CreateOp | MetricsOp | ParamsOp | TagsOp | EndOp


@dataclass
class Segment:
    """Ops of one write cycle that can be written in any order per kind: creations, then params/tags, then
    points, then ends.

    A segment never holds an op for a run after that run's end op, so ends are applied after all their
    points (the next segment gets the rest).
    """

    creates: list[CreateOp] = field(default_factory=list)
    params: dict[str, dict[str, str]] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)
    points: list[MetricsOp] = field(default_factory=list)
    ends: dict[str, EndOp] = field(default_factory=dict)


def segments(ops: Sequence[Op]) -> list[Segment]:
    segs = [Segment()]
    for op in ops:
        seg = segs[-1]
        # A new segment after the run's end, and before a param that changes a value already in this
        # segment (merging would hide the first value; MLflow must see and reject the change).
        old = seg.params.get(op.run_id, {})
        changes = isinstance(op, ParamsOp) and any(old.get(k, v) != v for k, v in op.params.items())
        if op.run_id in seg.ends or changes:
            seg = Segment()
            segs.append(seg)
        if isinstance(op, MetricsOp):
            seg.points.append(op)
        elif isinstance(op, CreateOp):
            seg.creates.append(op)
        elif isinstance(op, ParamsOp):
            seg.params.setdefault(op.run_id, {}).update(op.params)
        elif isinstance(op, TagsOp):
            seg.tags.setdefault(op.run_id, {}).update(op.tags)
        else:
            seg.ends[op.run_id] = op
    return segs


class Step(NamedTuple):
    """One write (one store call or one transaction), retried as a whole."""

    what: str
    n_points: int
    fn: Callable[[], None]
    wave: int | None = None
    """Consecutive steps of the same wave are independent: the writer may apply them concurrently (a
    tracking server's per-run requests); the next step waits for the whole wave."""


# ------------------------------------------------------------------------------------------------- helpers
def now_ms() -> int:
    return int(time.time() * 1000)


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# MLflow wraps connection errors in long multi-line messages; these substrings name the root cause.
_REASONS = (("Connection refused", "connection refused"), ("timed out", "timed out"),
            ("Name or service not known", "unknown host"), ("database is locked", "database is locked"),
            ("Connection aborted", "connection aborted"),
            ("RemoteDisconnected", "connection closed by server"))


def one_line(exc: BaseException) -> str:
    """Short reason for console messages: the recognizable root cause, else the first line."""
    text = str(exc)
    for needle, short in _REASONS:
        if needle in text:
            return short
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, MlflowException):
        return exc.error_code not in _PERMANENT_CODES
    # requests' errors are OSErrors; a locked SQLite file or a dropped database connection is an
    # OperationalError. Anything else (IntegrityError, TypeError, ...) will not fix itself.
    return isinstance(exc, OSError | sa.exc.OperationalError | sa.exc.InterfaceError
                      | sa.exc.DisconnectionError)


def quote(value: str) -> str:
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
