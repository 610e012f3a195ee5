"""Worker pools that train packs: :class:`RayPool` (persistent Ray actors, local or on a cluster) and
:class:`LocalPool` (one worker process on this machine). Both honour one contract
(tests/orchestrator/test_pool_contract.py):

- ``run(jobs, on_event)`` returns when every job finished or failed; ``on_event`` is called in the caller's
  thread, in order per pack, for every report; the returned list names the jobs that failed and why.
- ``on_done(job, failure)``, if given, is called in the caller's thread once per job, after its last report
  (``failure`` None when it finished); the jobs it returns join the same run. Asynchronous searches use it
  to ask for new trials the moment a worker frees up, instead of waiting for a whole round.
- ``on_idle(n)``, if given, is called in the caller's thread when ``n`` workers joined and nothing is queued
  for them; the jobs it returns join the run (a search asks for trials for the new workers).
- ``on_wait(seconds)``, if given, is called while no worker is alive (with the time waited so far), and once
  with None when workers are back.
- A job whose worker or node is lost runs again from its checkpoint, however often that happens; a job that
  raises inside its own training is retried ``max_retries`` times, then reported as failed. Only such own
  failures are ever returned: losing the workers never fails a job (:class:`WorkersLost` stops the run).
- A job that runs again continues from its checkpoint: the reports that checkpoint covers are not sent
  again, except those past the last one ``on_event`` received (a lost worker may have emitted them without
  their arriving; they come from the report log); those after the checkpoint come again with the same steps.
  The caller drops reports it has seen, by step. Every report is also in the pack's report log beside the
  checkpoint (:mod:`workers.reportlog`), for a driver that was killed before it recorded them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import queue
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions
from ray.autoscaler.sdk import request_resources

from workers.actor import PackWorker
from workers.jobs import PackEvent, PackJob, WorkerInfo
from workers.serve import reason_of

from . import libcompat, localray, localworker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobFailure:
    job: PackJob
    reason: str


class PoolError(RuntimeError):
    """A pool that cannot start (one-line message naming the fix)."""


class WorkersLost(PoolError):
    """No worker was alive for ``execution.wait_for_workers_s``: the run stops, nothing is failed."""


# A worker's process or node went away: the pack was not at fault and re-runs from its checkpoint, with no
# limit (spot preemptions, autoscaler scale-down, node crashes). OutOfMemoryError is not here: Ray's memory
# monitor kills the worker of a pack too big for its node, and retrying that forever would never end.
_INFRA_ERRORS: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError, ray.exceptions.LocalRayletDiedError)

# Previous versions failed networks with these reasons when workers were lost; `mfsweep resume` retries them.
_INFRA_REASONS = re.compile(r"worker died|no live Ray worker left|no Ray worker for")


def is_infrastructure_reason(reason: str) -> bool:
    """Whether a recorded failure reason names a lost worker rather than the network's own fault."""
    return bool(_INFRA_REASONS.search(reason))


OnDone = Callable[[PackJob, "JobFailure | None"], Sequence[PackJob]]
"""Called once per job after its last report (failure None when it finished); returns more jobs to run."""
OnIdle = Callable[[int], Sequence[PackJob]]
"""Called with the number of workers that joined with nothing queued for them; returns jobs for them."""
OnWait = Callable[["float | None"], None]
"""Called with the seconds waited while no worker is alive; None once workers are back."""


class Pool(ABC):
    workers: list[WorkerInfo]

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def memory_bytes(self) -> int:
        """The smallest worker's plannable memory (packs are sized to fit any worker)."""
        return min(w.memory_bytes for w in self.workers)

    @property
    def device(self) -> str:
        return self.workers[0].device

    @property
    def plan_workers(self) -> int:
        """How many workers to plan packs for."""
        return self.n_workers

    @abstractmethod
    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None,
            on_idle: OnIdle | None = None, on_wait: OnWait | None = None) -> list[JobFailure]: ...

    @abstractmethod
    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        """Drop one network from a running pack at its next report (pruning); a no-op once it ended."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalPool(Pool):
    """One worker process on this machine (:mod:`.localworker`), driven in lockstep like a generator in the
    driver's thread. A job that raises is retried from its checkpoint; a worker process that dies (killed, out
    of memory) is replaced and the job continues from its checkpoint without using up a retry, until it dies
    ``MAX_LOSSES`` times in a row with no new report: then the run stops (:class:`WorkersLost`), nothing
    failed."""

    MAX_LOSSES = 3

    def __init__(self, device: str = "auto", max_retries: int = 3) -> None:
        self._device = device
        self.max_retries = max_retries
        self.runner = self._start(localworker.take(device))

    @staticmethod
    def _start(worker: localworker.WorkerProcess) -> localworker.WorkerProcess:
        try:
            worker.info()
        except localworker.WorkerStartFailed as err:
            worker.close()
            raise PoolError(f"the local worker could not start: {err}") from None
        return worker

    @property
    def workers(self) -> list[WorkerInfo]:  # type: ignore[override]
        return [self.runner.info()]

    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        self.runner.request_retire(pack_id, net_id, status, reason)

    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None,
            on_idle: OnIdle | None = None, on_wait: OnWait | None = None) -> list[JobFailure]:
        failures: list[JobFailure] = []
        todo = collections.deque(jobs)
        while todo:
            job = todo.popleft()
            failure: JobFailure | None = None
            seen = -1
            raised = lost = 0
            run = job
            while True:
                if stop is not None and stop.is_set():
                    return failures
                before = seen
                try:
                    with contextlib.closing(self.runner.train(run)) as events:
                        for event in events:
                            seen = max(seen, event.report.step)
                            on_event(event)
                            if stop is not None and stop.is_set():
                                return failures
                    break
                except localworker.WorkerLost as err:
                    lost = lost + 1 if seen == before else 1
                    if lost >= self.MAX_LOSSES:
                        raise WorkersLost(f"{err}, {lost} times in a row on pack {job.pack_id} with no new "
                                          "report; nothing was recorded as failed: free memory or lower "
                                          "execution.max_networks_per_pack, then mfsweep resume DIR") from None
                    log.warning("%s; pack %s continues from its checkpoint in a new worker process", err,
                                job.pack_id)
                    self.runner.close()
                    self.runner = self._start(localworker.WorkerProcess(self._device))
                except Exception as err:  # the pack's own error: retry from the checkpoint
                    if raised == self.max_retries:
                        reason = str(err) if isinstance(err, localworker.WorkerRaised) else reason_of(err)
                        failure = JobFailure(job, reason)
                        failures.append(failure)
                        break
                    raised += 1
                run = dataclasses.replace(job, resend_after=seen)
            if on_done is not None:
                todo.extend(on_done(job, failure))
        return failures

    def close(self) -> None:
        self.runner.close()


@dataclass(frozen=True)
class _End:
    """A job's end in the event stream (after its last report); ``failure`` is its own fault, if any."""

    job: PackJob
    failure: JobFailure | None
    worker: _Worker | None = None


@dataclass(frozen=True)
class _Lost:
    """A job whose worker (process or node) went away: it runs again from its checkpoint."""

    job: PackJob
    attempt: int
    worker: _Worker
    reason: str


@dataclass(frozen=True)
class _Raised:
    """A job that raised inside its own training: retried up to ``max_retries``, then failed."""

    job: PackJob
    attempt: int
    worker: _Worker
    reason: str


@dataclass(frozen=True)
class _Stopped:
    worker: _Worker


@dataclass(eq=False)
class _Worker:
    """One actor: starting (``info`` None until it answered), idle, or running ``job``."""

    handle: ray.actor.ActorHandle
    probe: ray.ObjectRef
    since: float
    info: WorkerInfo | None = None
    job: PackJob | None = None


class RayPool(Pool):
    """Persistent Ray actors, one per GPU (or per ``cpus_per_worker`` CPUs), reused across packs, that follow
    the cluster: actors start on nodes that join (up to ``workers`` when set), a worker lost with its node
    hands its pack back to the queue, and with no worker alive the run waits for new ones
    (``wait_for_workers_s``, then :class:`WorkersLost`). ``max_workers`` bounds what the pool asks of the
    Ray autoscaler (``ray.autoscaler.sdk.request_resources``) for its queued and running packs."""

    STARTUP_S = 120.0
    """An actor that has not answered by then (no room for it after all) is dropped."""
    POLL_S = 1.0
    """How often the driver's loop looks at the cluster's nodes and resources."""

    def __init__(self, address: str | None = None, *, device: str = "auto", workers: int | None = None,
                 max_workers: int | None = None, cpus_per_worker: int = 1, max_retries: int = 3,
                 wait_for_workers_s: float = 3600.0, runtime_env: dict | None = None) -> None:
        self.max_retries = max_retries
        self.cpus_per_worker = cpus_per_worker
        self.cap = workers
        self.max_workers = max_workers
        self.wait_for_workers_s = wait_for_workers_s
        self._owns_ray = not ray.is_initialized()
        self.local = False
        if self._owns_ray:
            try:
                # No address: a fresh local instance (or RAY_ADDRESS, as under `ray job submit`), never a
                # `ray start` cluster that ray.init would otherwise find in /tmp/ray and silently join.
                target = address or (None if os.environ.get("RAY_ADDRESS") else "local")
                self.local = target == "local"
                if self.local:
                    localray.reap_dead_drivers(log.warning)
                # A cluster we start keeps token auth on (deploy/README.md, SECURITY) and runs workers at
                # the driver's priority (libcompat.local_ray_env says why).
                with libcompat.local_ray_env() if self.local else contextlib.nullcontext():
                    ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False,
                             include_dashboard=False if address is None else None, runtime_env=runtime_env,
                             configure_logging=True)
                if self.local:
                    localray.record_local_ray()
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = address or "a local cluster"
                raise PoolError(f"cannot connect to Ray at {where}: {err}; check --address (ray://host:10001 "
                                "or host:6379) or omit it for a local cluster") from None
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        if device == "cuda" and gpus == 0 and self.local:
            raise PoolError("execution.device=cuda but the Ray cluster has no GPU; use --device cpu or auto")
        # On a cluster, device=cuda waits for GPU nodes (the autoscaler may be adding them).
        self.use_gpu = device == "cuda" or (gpus > 0 and device == "auto")
        self.device_kind = "cuda" if self.use_gpu else "cpu"
        alive = [nd for nd in ray.nodes() if nd.get("Alive")]
        per_node = max((self._slots_of(nd.get("Resources", {})) for nd in alive), default=1)
        # Memory a CPU worker plans with: its share of the busiest node's RAM.
        self._slots = max(1, min(per_node, self.cap or per_node))
        self._workers: list[_Worker] = []
        self._running: dict[str, ray.actor.ActorHandle] = {}
        self._seen: dict[str, int] = {}
        """pack id -> last report step received (a job run again re-sends what its checkpoint covers past it)."""
        self.worker_nodes: dict[str, str] = {}
        """Every worker this pool ever had (name -> Ray node id): where packs ran."""
        self._requested: int | None = None
        self._poll(need=self.cap or 1 << 30)  # a worker in every slot there is now
        starting = [w.probe for w in self._workers]
        if starting:  # planning needs them all: wait until they answered (or could not start)
            ray.wait(starting, num_returns=len(starting), timeout=self.STARTUP_S)
            self._poll(need=0)
        if not self._live():
            self._wait_for_first()

    # ------------------------------------------------------------------ the cluster
    def _slots_of(self, res: dict[str, float]) -> int:
        cpu_slots = int(res.get("CPU", 0) // self.cpus_per_worker)
        return min(int(res.get("GPU", 0)), cpu_slots) if self.use_gpu else cpu_slots

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.info is not None]

    @property
    def workers(self) -> list[WorkerInfo]:  # type: ignore[override]
        return [w.info for w in self._workers if w.info is not None]

    @property
    def plan_workers(self) -> int:
        """Workers to plan packs for: twice the workers there are (or may be, up to ``max_workers``) on a
        cluster, so that nodes joining later find packs still queued; the workers there are on a local
        cluster, which does not grow."""
        if self.local:
            return self.n_workers
        expected = max(self.n_workers, self.max_workers or 0)
        return 2 * min(expected, self.cap or expected)

    def _new_actor(self) -> _Worker:
        opts: dict = {"num_cpus": self.cpus_per_worker, "max_concurrency": 2}
        if self.use_gpu:
            opts["num_gpus"] = 1
        threads = None if self.use_gpu else self.cpus_per_worker
        handle: Any = PackWorker.options(**opts).remote(self.device_kind, threads, self._slots)
        return _Worker(handle, handle.info.remote(), time.monotonic())

    def _drop(self, w: _Worker) -> None:
        if w in self._workers:
            self._workers.remove(w)
        with contextlib.suppress(Exception):  # already dead
            ray.kill(w.handle)

    def _poll(self, need: int) -> None:
        """Look at the cluster: workers that answered join, workers whose node left are dropped, and new
        actors start where Ray has room for them, while ``need`` (packs waiting for a worker) exceeds the
        idle and starting workers."""
        starting = [w for w in self._workers if w.info is None]
        if starting:
            ready, _ = ray.wait([w.probe for w in starting], num_returns=len(starting), timeout=0)
            done = set(ready)
            for w in starting:
                if w.probe in done:
                    try:
                        w.info = ray.get(w.probe)
                        self.worker_nodes[w.info.worker] = w.info.node
                        if self.local:  # its process too, should this driver be killed
                            localray.record_local_ray()
                        log.info("worker %s joined on node %s", w.info.worker, w.info.node[:12])
                    except Exception as err:  # died before it answered (its node left)
                        log.warning("a starting worker died: %s", type(err).__name__)
                        self._drop(w)
                elif time.monotonic() - w.since > self.STARTUP_S:
                    self._drop(w)  # its resources went elsewhere; drop the pending placement
        alive_nodes = {nd["NodeID"] for nd in ray.nodes() if nd.get("Alive")}
        for w in self._live():
            if w.info is not None and w.info.node not in alive_nodes and w.job is None:
                log.warning("worker %s left with its node", w.info.worker)
                self._drop(w)
        idle = sum(1 for w in self._workers if w.job is None)
        room = self._slots_of(ray.available_resources()) - sum(1 for w in self._workers if w.info is None)
        n_new = min(need - idle, room, (self.cap or 1 << 30) - len(self._workers))
        for _ in range(max(0, n_new)):
            self._workers.append(self._new_actor())
        self._ask_autoscaler(need + sum(1 for w in self._workers if w.job is not None))

    def _ask_autoscaler(self, want: int) -> None:
        """Ask the autoscaler to fit ``want`` workers (at most ``max_workers``); a no-op without an autoscaler."""
        if self.max_workers is None or self.local:
            return
        n = min(want, self.max_workers, self.cap or want)
        if n == self._requested:
            return
        bundle = {"CPU": float(self.cpus_per_worker), **({"GPU": 1.0} if self.use_gpu else {})}
        try:
            request_resources(bundles=[dict(bundle) for _ in range(n)])
            self._requested = n
        except Exception as err:  # the request is a hint: never fatal
            log.warning("could not ask the autoscaler for %d workers: %s", n, err)
            self._requested = n

    def _wait_for_first(self) -> None:
        """No worker yet (a cluster scaled to zero, or still starting): wait for one."""
        t0 = time.monotonic()
        deadline = t0 + (min(self.wait_for_workers_s, self.STARTUP_S) if self.local else self.wait_for_workers_s)
        shown = -1.0
        while not self._live():
            waited = time.monotonic() - t0
            if time.monotonic() > deadline:
                kind = "1 GPU" if self.use_gpu else f"{self.cpus_per_worker} CPU"
                raise WorkersLost(f"no Ray worker started within {waited:.0f} s (each needs {kind}); add nodes "
                                  "or GPUs to the cluster, lower execution.cpus_per_worker, or raise "
                                  "execution.wait_for_workers_s")
            if waited - shown >= 30:
                log.warning("waiting for workers (%.0f s)", waited)
                shown = waited
            self._poll(need=1)
            time.sleep(self.POLL_S)  # waiting on the cluster: nothing to wake us earlier

    # ------------------------------------------------------------------ running
    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        actor = self._running.get(pack_id)
        if actor is not None:
            actor.request_retire.remote(pack_id, net_id, status, reason)

    def _serve(self, w: _Worker, job: PackJob, attempt: int, events: queue.Queue[Any],
               stop: threading.Event) -> None:
        """Stream one job's reports from worker ``w`` into ``events``, then how it ended."""
        try:
            gen: Any = w.handle.train.options(num_returns="streaming").remote(job)
            for ref in gen:
                events.put(ray.get(ref))
                if stop.is_set():
                    ray.cancel(gen)
                    events.put(_Stopped(w))
                    return
            events.put(_End(job, None, w))
        except _INFRA_ERRORS as err:
            events.put(_Lost(job, attempt, w, f"worker died ({type(err).__name__})"))
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if getattr(err, "cause", None) is not None else err
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            events.put(_Raised(job, attempt, w, f"{type(cause).__name__}: {first}"))
        except Exception as err:  # e.g. OutOfMemoryError: the pack's own doing
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            events.put(_Raised(job, attempt, w, f"{type(err).__name__}: {first}"))

    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None,
            on_idle: OnIdle | None = None, on_wait: OnWait | None = None) -> list[JobFailure]:
        stop = stop or threading.Event()
        if not jobs:
            return []
        todo: collections.deque[tuple[PackJob, int]] = collections.deque((j, 0) for j in jobs)
        # Reports and job ends, in order per job (a job's end follows its last report).
        events: queue.Queue[Any] = queue.Queue()
        failures: list[JobFailure] = []
        remaining = len(jobs)  # jobs queued or running, not yet ended
        threads: list[threading.Thread] = []
        waiting_since: float | None = None
        next_poll = 0.0
        known = set(self._live())

        def end(job: PackJob, failure: JobFailure | None) -> None:
            nonlocal remaining
            remaining -= 1
            if failure is not None:
                failures.append(failure)
            more = on_done(job, failure) if on_done is not None else ()
            if not stop.is_set():
                todo.extend((j, 0) for j in more)
                remaining += len(more)

        while remaining and not stop.is_set():
            now = time.monotonic()
            if now >= next_poll:
                # With on_idle the caller makes work for any worker that joins (a search asks new trials).
                self._poll(need=len(todo) + (self.cap or 1 << 20 if on_idle is not None else 0))
                next_poll = now + self.POLL_S
                joined = [w for w in self._live() if w not in known and w.job is None]
                known |= set(self._live())
                if joined and not todo and on_idle is not None:
                    more = on_idle(len(joined))  # fresh workers with nothing queued: ask for more work
                    todo.extend((j, 0) for j in more)
                    remaining += len(more)
            for w in self._live():
                if w.job is None and todo:
                    job, attempt = todo.popleft()
                    w.job = job
                    self._running[job.pack_id] = w.handle
                    t = threading.Thread(target=self._serve, args=(w, job, attempt, events, stop), daemon=True,
                                         name=f"pool-{job.pack_id}")
                    t.start()
                    threads.append(t)
            if not self._live() and todo:
                if waiting_since is None:
                    waiting_since = now
                    log.warning("no Ray worker alive; waiting for workers (up to %.0f s)",
                                self.wait_for_workers_s)
                if on_wait is not None:
                    on_wait(now - waiting_since)
                if now - waiting_since > self.wait_for_workers_s:
                    raise WorkersLost(f"no Ray worker for {now - waiting_since:.0f} s "
                                      f"(execution.wait_for_workers_s={self.wait_for_workers_s:g}); "
                                      f"{len(todo)} pack(s) left, none recorded as failed")
            elif waiting_since is not None:
                waiting_since = None
                if on_wait is not None:
                    on_wait(None)
            try:
                item = events.get(timeout=0.2)
            except queue.Empty:
                continue
            self._handle(item, todo, on_event, end)
        for t in threads:
            t.join(timeout=5)
        while not events.empty():  # reports and ends that raced a stop
            item = events.get()
            self._handle(item, collections.deque(), on_event, end)
        return failures

    def _again(self, job: PackJob) -> PackJob:
        """The job to run again: it re-sends what its checkpoint covers past the last report received."""
        return dataclasses.replace(job, resend_after=self._seen.get(job.pack_id, -1))

    def _handle(self, item: Any, todo: collections.deque[tuple[PackJob, int]],
                on_event: Callable[[PackEvent], None], end: Callable[[PackJob, JobFailure | None], None]) -> None:
        if isinstance(item, PackEvent):
            self._seen[item.pack_id] = max(self._seen.get(item.pack_id, -1), item.report.step)
            on_event(item)
            return
        w: _Worker | None = item.worker
        if w is not None:
            if w.job is not None:
                self._running.pop(w.job.pack_id, None)
            w.job = None
        if isinstance(item, _End):
            end(item.job, item.failure)
        elif isinstance(item, _Lost):
            w = item.worker
            where = w.info.node[:12] if w.info is not None else "?"
            log.warning("pack %s: %s on node %s; re-queued from its checkpoint", item.job.pack_id, item.reason,
                        where)
            self._drop(w)
            todo.appendleft((self._again(item.job), item.attempt))  # first in line: it has the most work done
        elif isinstance(item, _Raised):
            if item.attempt < self.max_retries:
                log.warning("pack %s raised (%s); attempt %d", item.job.pack_id, item.reason, item.attempt + 2)
                todo.appendleft((self._again(item.job), item.attempt + 1))
            else:
                end(item.job, JobFailure(item.job, item.reason))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ask_autoscaler(0)
        for w in list(self._workers):
            self._drop(w)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            if self.local:
                localray.forget_local_ray()


def open_beside(make: Callable[[], Pool | None], side: Callable[[], object]) -> Pool | None:
    """``make()`` in this thread while ``side()`` runs in another: MLflow's import, migrations and parent run
    (seconds of Python) overlap Ray's boot (seconds of waiting for its processes). An error of ``side``
    wins, since it names its own fix; the pool is then closed."""
    with ThreadPoolExecutor(1, thread_name_prefix="open-beside") as ex:
        side_done = ex.submit(side)
        pool: Pool | None = None
        try:
            pool = make()
        finally:
            try:
                side_done.result()
            except BaseException:
                if pool is not None:
                    pool.close()
                raise
    return pool


def close_in_background(pool: Pool) -> threading.Thread:
    """Shut the pool down (Ray takes a second or two) while the caller goes on with its analysis."""
    closer = threading.Thread(target=pool.close, name="pool-close", daemon=True)
    closer.start()
    return closer


def make_pool(backend: str, *, address: str | None, device: str, workers: int | None, cpus_per_worker: int,
              max_retries: int, max_workers: int | None = None, wait_for_workers_s: float = 3600.0,
              py_modules: Sequence[str] = ()) -> Pool:
    """``py_modules``: local packages or .py files the workers must import (a user's target function),
    shipped through Ray's runtime environment."""
    if backend == "local":
        if address:
            raise PoolError("--address needs execution.backend=ray")
        return LocalPool(device, max_retries)
    env: dict[str, Any] = {}
    if address:
        env["env_vars"] = {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    if py_modules:
        env["py_modules"] = list(py_modules)
    return RayPool(address, device=device, workers=workers, cpus_per_worker=cpus_per_worker,
                   max_retries=max_retries, max_workers=max_workers, wait_for_workers_s=wait_for_workers_s,
                   runtime_env=env or None)


__all__ = ["JobFailure", "LocalPool", "Pool", "PoolError", "RayPool", "WorkersLost", "close_in_background",
           "is_infrastructure_reason", "make_pool", "open_beside"]
