"""Worker pools that train packs: :class:`RayPool` (persistent Ray actors, local or on a cluster) and
:class:`LocalPool` (in-process). Both honour one contract (tests/orchestrator/test_pool_contract.py):

- ``run(jobs, on_event)`` returns when every job finished or failed; ``on_event`` is called in the caller's
  thread, in order per pack, for every report; the returned list names the jobs that failed and why.
- ``on_done(job, failure)``, if given, is called in the caller's thread once per job, after its last report
  (``failure`` None when it finished); the jobs it returns join the same run. Asynchronous searches use it
  to ask for new trials the moment a worker frees up, instead of waiting for a whole round.
- A job whose worker dies is retried (up to ``max_retries``) on another worker from its checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions

from workers.actor import PackRunner, PackWorker
from workers.jobs import PackEvent, PackJob, WorkerInfo

log = logging.getLogger(__name__)
# Ray warns at every start that token authentication is on; it stays on (deploy/README.md, SECURITY).
logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


@dataclass(frozen=True)
class JobFailure:
    job: PackJob
    reason: str


class PoolError(RuntimeError):
    """A pool that cannot start (one-line message naming the fix)."""


OnDone = Callable[[PackJob, "JobFailure | None"], Sequence[PackJob]]
"""Called once per job after its last report (failure None when it finished); returns more jobs to run."""


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

    @abstractmethod
    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None) -> list[JobFailure]: ...

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
    """One in-process worker; a job that raises is retried from its checkpoint like a dead actor's."""

    def __init__(self, device: str = "auto", max_retries: int = 3) -> None:
        self.runner = PackRunner(device)
        self.workers = [self.runner.info()]
        self.max_retries = max_retries

    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        self.runner.request_retire(pack_id, net_id, status, reason)

    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None) -> list[JobFailure]:
        failures: list[JobFailure] = []
        todo = collections.deque(jobs)
        while todo:
            job = todo.popleft()
            failure: JobFailure | None = None
            for attempt in range(self.max_retries + 1):
                if stop is not None and stop.is_set():
                    return failures
                try:
                    for event in self.runner.train(job):
                        on_event(event)
                        if stop is not None and stop.is_set():
                            return failures
                    break
                except Exception as err:  # a crashed worker: retry from the checkpoint
                    if attempt == self.max_retries:
                        failure = JobFailure(job, f"{type(err).__name__}: {err}")
                        failures.append(failure)
            if on_done is not None:
                todo.extend(on_done(job, failure))
        return failures


@dataclass(frozen=True)
class _End:
    """A job's end in the event stream (after its last report)."""

    job: PackJob
    failure: JobFailure | None


class RayPool(Pool):
    """Persistent Ray actors, one per GPU (or per ``cpus_per_worker`` CPUs), reused across packs."""

    def __init__(self, address: str | None = None, *, device: str = "auto", workers: int | None = None,
                 cpus_per_worker: int = 1, max_retries: int = 3, runtime_env: dict | None = None) -> None:
        self.max_retries = max_retries
        self.cpus_per_worker = cpus_per_worker
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                # No address: a fresh local instance (or RAY_ADDRESS, as under `ray job submit`), never a
                # `ray start` cluster that ray.init would otherwise find in /tmp/ray and silently join.
                target = address or (None if os.environ.get("RAY_ADDRESS") else "local")
                # Ray runs workers at nice 15: on a machine shared with any other busy process they got
                # ~3% of a core (a search ran 12x slower beside one study.optimize). A cluster we start
                # runs them at the driver's priority.
                system = {"worker_niceness": 0} if target == "local" else None
                ray.init(address=target, logging_level=logging.WARNING, log_to_driver=False,
                         include_dashboard=False if address is None else None, runtime_env=runtime_env,
                         configure_logging=True, _system_config=system)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = address or "a local cluster"
                raise PoolError(f"cannot connect to Ray at {where}: {err}; check --address (ray://host:10001 "
                                "or host:6379) or omit it for a local cluster") from None
        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        if device == "cuda" and gpus == 0:
            raise PoolError("execution.device=cuda but the Ray cluster has no GPU; use --device cpu or auto")
        self.use_gpu = gpus > 0 and device in ("auto", "cuda")
        n = workers or (gpus if self.use_gpu else max(1, cpus // cpus_per_worker))
        self.device_kind = "cuda" if self.use_gpu else "cpu"
        nodes = max(1, len([nd for nd in ray.nodes() if nd.get("Alive")]))
        self._slots = max(1, n // nodes)
        self._actor_id = 0
        self._running: dict[str, ray.actor.ActorHandle] = {}
        self.actors = [self._new_actor() for _ in range(n)]
        try:
            self.workers = ray.get([a.info.remote() for a in self.actors], timeout=120)
        except ray.exceptions.GetTimeoutError:
            raise PoolError(f"{n} Ray workers did not start within 120 s; the cluster lacks resources "
                            f"(asked {'1 GPU' if self.use_gpu else f'{cpus_per_worker} CPU'} each); "
                            "lower execution.workers") from None

    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        actor = self._running.get(pack_id)
        if actor is not None:
            actor.request_retire.remote(pack_id, net_id, status, reason)

    def _new_actor(self) -> ray.actor.ActorHandle:
        self._actor_id += 1
        opts: dict = {"num_cpus": self.cpus_per_worker, "max_concurrency": 2}
        if self.use_gpu:
            opts["num_gpus"] = 1
        threads = None if self.use_gpu else self.cpus_per_worker
        return PackWorker.options(**opts).remote(self.device_kind, threads, self._slots)  # type: ignore[return-value]

    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None) -> list[JobFailure]:
        stop = stop or threading.Event()
        if not jobs:
            return []
        todo: queue.Queue[tuple[PackJob, int]] = queue.Queue()
        for job in jobs:
            todo.put((job, 0))
        # Reports and job ends, in order per serving thread (so a job's end follows its last report).
        events: queue.Queue[PackEvent | _End] = queue.Queue()
        finished = threading.Event()  # no job left: the serving threads return

        def serve(slot: int) -> None:
            actor = self.actors[slot]
            while not (stop.is_set() or finished.is_set()):
                try:
                    job, attempt = todo.get(timeout=0.05)
                except queue.Empty:
                    continue
                self._running[job.pack_id] = actor
                try:
                    gen: Any = actor.train.options(num_returns="streaming").remote(job)
                    for ref in gen:
                        events.put(ray.get(ref))
                        if stop.is_set():
                            ray.cancel(gen)
                            return
                    events.put(_End(job, None))
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                        ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError) as err:
                    reason = f"worker died ({type(err).__name__})"
                    log.warning("pack %s: %s; attempt %d", job.pack_id, reason, attempt + 1)
                    if attempt < self.max_retries:
                        todo.put((job, attempt + 1))
                    else:
                        events.put(_End(job, JobFailure(job, f"{reason} {attempt + 1} times")))
                    replacement = self._replace(slot, lambda: stop.is_set() or finished.is_set())
                    if replacement is None:
                        return
                    actor = replacement
                except ray.exceptions.RayTaskError as err:
                    cause = err.cause if getattr(err, "cause", None) is not None else err
                    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                    if attempt < self.max_retries:
                        todo.put((job, attempt + 1))
                    else:
                        events.put(_End(job, JobFailure(job, f"{type(cause).__name__}: {first}")))
                finally:
                    self._running.pop(job.pack_id, None)

        threads = [threading.Thread(target=serve, args=(i,), daemon=True, name=f"pool-{i}")
                   for i in range(len(self.actors))]
        for t in threads:
            t.start()
        failures: list[JobFailure] = []
        remaining = len(jobs)  # only this thread counts: jobs queued or running, not yet ended
        while remaining:
            try:
                item = events.get(timeout=0.5)
            except queue.Empty:
                if stop.is_set() or not any(t.is_alive() for t in threads):
                    break
                continue
            if isinstance(item, _End):
                remaining -= 1
                if item.failure is not None:
                    failures.append(item.failure)
                more = on_done(item.job, item.failure) if on_done is not None else ()
                for job in more:
                    todo.put((job, 0))
                remaining += len(more)
            else:
                on_event(item)
        finished.set()
        for t in threads:
            t.join(timeout=5)
        while not events.empty():  # reports that raced a stop
            item = events.get()
            if isinstance(item, _End):
                if item.failure is not None:
                    failures.append(item.failure)
                if on_done is not None:
                    on_done(item.job, item.failure)  # stopping: no new jobs
            else:
                on_event(item)
        if not stop.is_set():
            # Jobs left in the queue when every worker is gone: fail them with a reason.
            while True:
                try:
                    job, _ = todo.get_nowait()
                except queue.Empty:
                    break
                failure = JobFailure(job, "no live Ray worker left to run it")
                failures.append(failure)
                if on_done is not None:
                    on_done(job, failure)
        return failures

    def _replace(self, slot: int, idle: Callable[[], bool]) -> ray.actor.ActorHandle | None:
        """A fresh actor for a dead one (Ray places it on a live node); None when none starts within 60 s
        or the run no longer needs it (``idle()``)."""
        try:
            actor = self._new_actor()
            ping: Any = actor.ping.remote()
            deadline = time.monotonic() + 60
            while not ray.wait([ping], timeout=1.0)[0]:
                if idle() or time.monotonic() > deadline:
                    ray.kill(actor)  # drop the pending placement so it never grabs a slot later
                    log.warning("no room to replace a dead worker; going on with %d fewer", 1)
                    return None
            ray.get(ping)
        except Exception as err:
            log.warning("could not replace a dead worker: %s", err)
            return None
        self.actors[slot] = actor
        return actor

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(a)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()


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
              max_retries: int, py_modules: Sequence[str] = ()) -> Pool:
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
                   max_retries=max_retries, runtime_env=env or None)


__all__ = ["JobFailure", "LocalPool", "Pool", "PoolError", "RayPool", "close_in_background", "make_pool",
           "open_beside"]
