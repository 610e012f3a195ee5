"""The write queue: callers enqueue operations and never wait on I/O; one background thread groups them
into segments, has the store plan each segment's writes, and applies them with capped exponential backoff
through outages."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..errors import TrackingError
from .common import (
    BACKOFF_CAP_S,
    BACKOFF_FIRST_S,
    EndOp,
    MetricsOp,
    Op,
    Step,
    T,
    TrackerStats,
    is_transient,
    log,
    one_line,
    segments,
)
from .stores import Store

# Requests in flight together for a wave: enough to hide a tracking server's latency per request, few enough
# not to crowd a small server.
WAVE_THREADS = 4


class _GiveUp(Exception):
    """Internal: retries exhausted; the writer is now broken."""


def call_with_retry(what: str, fn: Callable[[], T], *, retry_max_s: float, tracking_uri: str) -> T:
    """Run a synchronous MLflow call, retrying outages like the writer does."""
    t0 = time.monotonic()
    delay = BACKOFF_FIRST_S
    warned = False
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise TrackingError(f"MLflow rejected {what}: {one_line(exc)}") from exc
            waited = time.monotonic() - t0
            if waited >= retry_max_s:
                raise TrackingError(f"gave up on {what} after {waited:.0f}s: MLflow at {tracking_uri} "
                                    f"unavailable ({one_line(exc)}); restart it and resume the sweep") from exc
            if not warned:
                log.warning("MLflow at %s unavailable during %s (%s); retrying for up to %.0fs",
                            tracking_uri, what, one_line(exc), retry_max_s)
                warned = True
            time.sleep(min(delay, max(0.0, retry_max_s - waited)))
            delay = min(delay * 2, BACKOFF_CAP_S)


class Writer:
    """Queue + writer thread.

    Invariants: an end op is applied after every op of that run enqueued before it; a point is written, or
    counted lost and reported once by ``flush``/``close``; after ``retry_max_s`` without a successful write
    the writer is broken and every later call raises TrackingError.
    """

    def __init__(self, store: Store, tracking_uri: str, *, flush_interval_s: float, max_batch: int,
                 retry_max_s: float, max_queued: int = 20_000,
                 on_ended: Callable[[list[str]], None] | None = None) -> None:
        """``on_ended`` hears, on the writer thread, the runs whose ends a cycle applied (written or
        reported lost): nothing queued for them before their end is left."""
        self.store = store
        self._on_ended = on_ended
        # Backpressure: while the store is up but slower than the callers, enqueue waits once this many ops
        # queue up, so the driver's memory is bounded by what is in flight (two cycles' worth at most), not
        # by the sweep's size. During an outage it never waits: the queue grows until retry_max_s.
        self._max_queued = max_queued
        self._uri = tracking_uri
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._retry_max_s = retry_max_s
        self._cv = threading.Condition()
        self._ops: list[Op] = []
        self._queued = 0
        self._seq_enqueued = 0
        self._seq_done = 0
        self._flush_waiters = 0
        self._closing = False
        self._closed = False
        self._broken: str | None = None
        self._unreported: list[str] = []
        self._points_enqueued = 0
        self._points_logged = 0
        self._points_lost = 0
        self._batches = 0
        self._retries = 0
        self._outage_since: float | None = None
        self.waits = 0
        """Times a caller waited for the writer (the queue was at max_queued)."""
        # Applies the steps of a wave together (see Step.wave); idle unless the store plans waves.
        self._pool = ThreadPoolExecutor(WAVE_THREADS, thread_name_prefix="mfsweep-mlflow-wave")
        self._thread = threading.Thread(target=self._run, name="mfsweep-mlflow-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def check_usable(self) -> None:
        if self._broken is not None:
            raise TrackingError(self._broken)
        if self._closed or self._closing:
            raise TrackingError("the MLflow tracker is closed; create a new Tracker")

    def enqueue(self, op: Op, n_points: int = 0) -> None:
        with self._cv:
            self.check_usable()
            while (len(self._ops) >= self._max_queued and self._outage_since is None and not self._closing
                   and self._broken is None and self._thread.is_alive()):
                self.waits += 1
                self._cv.notify_all()
                self._cv.wait()
            self._ops.append(op)
            self._seq_enqueued += 1
            # Points and other ops both fill a batch: a burst of run creations is written without waiting.
            self._queued += max(1, n_points)
            self._points_enqueued += n_points
            if self._queued >= self._max_batch:
                self._cv.notify_all()

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
                                            f"pending; MLflow at {self._uri} is slow or down")
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
        """Flush, stop the writer thread and release the store; raise TrackingError on loss."""
        with self._cv:
            if self._closed:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self._pool.shutdown(wait=True)
        with self._cv:
            self._closed = True
        self.store.close()
        with self._cv:
            if self._broken is not None:
                msg, self._broken = self._broken, None  # reported once; closed from now on
                raise TrackingError(msg)
            self._raise_unreported()

    @property
    def stats(self) -> TrackerStats:
        with self._cv:
            return TrackerStats(
                points_logged=self._points_logged, batches=self._batches, retries=self._retries,
                pending=self._points_enqueued - self._points_logged - self._points_lost,
                points_lost=self._points_lost)

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            with self._cv:
                deadline = time.monotonic() + self._flush_interval_s
                # A flush only cuts the wait short when there is something to write.
                while not (self._closing or (self._flush_waiters and self._ops) or self._queued >= self._max_batch):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cv.wait(remaining)
                ops, self._ops = self._ops, []
                self._queued = 0
                self._cv.notify_all()  # callers held back by max_queued
                last_seq = self._seq_enqueued
                closing = self._closing
            if ops:
                done_before = self._points_logged + self._points_lost
                try:
                    self._write(ops)
                except Exception as exc:  # a bug here must not hang flush(): count the rest as lost
                    log.exception("MLflow writer failed")
                    self._fail_rest(ops, done_before, f"MLflow writer crashed ({one_line(exc)}); report this bug")
                if self._on_ended is not None:
                    ended = [op.run_id for op in ops if type(op) is EndOp]
                    if ended:
                        self._on_ended(ended)
            with self._cv:
                self._seq_done = last_seq
                self._cv.notify_all()
                if closing and not self._ops:
                    return

    def _fail_rest(self, ops: Sequence[Op], done_before: int, msg: str) -> None:
        with self._cv:
            n = sum(len(op.metrics) for op in ops if isinstance(op, MetricsOp)) - (
                self._points_logged + self._points_lost - done_before)
            self._points_lost += n
            self._unreported.append(f"{msg}; {n} metric points were not written")

    def _write(self, ops: list[Op]) -> None:
        if self._broken is not None:  # gave up earlier; _give_up already counted these points as lost
            return
        for seg in segments(ops):
            # Consecutive steps of one wave are applied together; a step without a wave is a group alone.
            for _, group in itertools.groupby(self.store.plan(seg),
                                              key=lambda s: object() if s.wave is None else s.wave):
                wave = list(group)
                try:
                    if len(wave) == 1:
                        self._apply(wave[0])
                    else:
                        for future in [self._pool.submit(self._apply, s) for s in wave]:
                            future.result()
                except _GiveUp:
                    return

    def _apply(self, step: Step) -> None:
        """Apply one write, retrying outages; permanent errors are recorded (not retried). Thread-safe: the
        steps of a wave run on the pool."""
        delay = BACKOFF_FIRST_S
        while True:
            if self._broken is not None:  # another step of this wave gave up: its points are counted lost
                raise _GiveUp
            try:
                step.fn()
            except Exception as exc:
                if not is_transient(exc):
                    msg = f"MLflow rejected {step.what}: {one_line(exc)}"
                    log.error("%s", msg)
                    with self._cv:
                        self._points_lost += step.n_points
                        self._unreported.append(
                            f"{msg}; {step.n_points} metric points were not written" if step.n_points else msg)
                    return
                now = time.monotonic()
                with self._cv:
                    self._retries += 1
                    first = self._outage_since is None
                    if first:
                        self._outage_since = now
                        self._cv.notify_all()  # held-back callers may queue again: we buffer outages
                    since = self._outage_since
                    pending = self._points_enqueued - self._points_logged - self._points_lost
                assert since is not None
                if first:
                    log.warning("MLflow at %s unavailable (%s); keeping %d points buffered, retrying for "
                                "up to %.0fs", self._uri, one_line(exc), pending, self._retry_max_s)
                if now - since >= self._retry_max_s:
                    self._give_up(exc, now - since)
                    raise _GiveUp from exc
                time.sleep(min(delay, max(0.05, self._retry_max_s - (now - since))))
                delay = min(delay * 2 * (0.75 + 0.5 * random.random()), BACKOFF_CAP_S)
                continue
            with self._cv:
                if self._broken is not None:  # written after all, but already counted lost by _give_up
                    return
                self._batches += 1
                self._points_logged += step.n_points
                if self._outage_since is not None:
                    log.info("MLflow at %s is back after %.1fs; writing the backlog", self._uri,
                             time.monotonic() - self._outage_since)
                    self._outage_since = None
            return

    def _give_up(self, exc: BaseException, waited: float) -> None:
        with self._cv:
            if self._broken is not None:  # another step of the wave gave up first
                return
            # Everything not yet written is lost: this cycle's remainder and whatever is still queued.
            lost = self._points_enqueued - self._points_logged - self._points_lost
            self._points_lost += lost
            msg = (f"gave up writing to MLflow at {self._uri} after {waited:.0f}s ({one_line(exc)}); {lost} "
                   f"metric points were not written; restart the server and resume the sweep")
            self._broken = msg
            self._cv.notify_all()
        log.error("%s", msg)
