"""A simulated worker pool: the pool contract (:mod:`.pool`) served by fake worker threads that emit, for
each pack job, the reports a real worker's pack emits, from a planted loss curve, without training.

It drives everything downstream of the pool for real (ledger, tracker, results.jsonl, analysis): a
``ScalingSweep(..., pool_factory=SimPool.factory(...))`` is ``mfsweep scaling`` with the training replaced.
``bench/scale.py`` measures the driver with it; tests check the sweep end to end on it.

What a fake worker sends for a pack (the shape of :meth:`workers.engine.Pack.train`): a report at step 0,
every ``eval_every`` steps and at the cap, each with every running network's point (``test_loss``;
``train_loss`` from the first step on); at the cap every network retires as finished with its final-window
:class:`~workers.engine.Estimate`, from the engine's own window (:class:`workers.engine.stopping.Window`)
over the reports the engine's window holds at the cap. Networks run to the cap (the ``fixed`` stop rule)
unless :meth:`SimPool.request_retire` drops one, which then retires at the next report, as in a real pack.
No checkpoint and no report log are written, so a resumed sweep starts its packs afresh; no job ever fails
and no worker is ever lost.

The curve: L(n, t) = A / n * f * (1 + B / (1 + t)), with f a per-network lognormal factor (deterministic in
the network's id): every network's window mean is A f c / n with c the same for all widths, so the
sweep's fit sees the planted exponent -1 (an additive transient B / (1 + t) would add a floor).
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from workers.engine import NetMetrics, NetStatus, Report, Retired
from workers.engine.stopping import Window, window_start
from workers.jobs import PackEvent, PackJob, WorkerInfo

from .config import ExecutionConfig
from .pool import JobFailure, OnDone, OnIdle, OnWait, Pool

__all__ = ["PlantedCurve", "SimPool"]


@dataclass(frozen=True)
class PlantedCurve:
    """L(n, t) = amplitude / n * f * (1 + transient / (1 + t)), f = exp(noise * z), z ~ N(0, 1) per network."""

    amplitude: float = 2.0
    transient: float = 1.0
    noise: float = 0.05
    exponent: float = -1.0
    """The law's exponent in width (what the sweep's fit should recover)."""

    def factor(self, net_id: int) -> float:
        return math.exp(self.noise * random.Random(net_id).gauss(0.0, 1.0))

    def loss(self, width: int, factor: float, step: int) -> float:
        return self.amplitude * width ** self.exponent * factor * (1.0 + self.transient / (1.0 + step))


@dataclass(frozen=True)
class _End:
    job: PackJob


_STOP = object()


class SimPool(Pool):
    """``n_workers`` fake workers (threads), each emitting one pack's reports ``interval_s`` apart (0: as
    fast as the driver takes them; a bounded queue makes a worker wait for a driver that lags, as a real
    worker's stream is paced by its training). ``worker_cpu_s`` is the CPU time the fake workers spent, so a
    benchmark can tell the driver's share of the process's CPU time."""

    def __init__(self, n_workers: int, *, curve: PlantedCurve | None = None, interval_s: float = 0.0,
                 memory_bytes: int = 64 << 30, queue_per_worker: int = 4) -> None:
        if n_workers < 1:
            raise ValueError("SimPool needs at least one worker")
        self.curve = curve or PlantedCurve()
        self.interval_s = interval_s
        self.workers = [WorkerInfo(f"sim-{i}", "sim-node", "cpu", memory_bytes) for i in range(n_workers)]
        self._jobs: queue.Queue[object] = queue.Queue()
        self._events: queue.Queue[object] = queue.Queue(maxsize=queue_per_worker * n_workers)
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._retire: dict[str, dict[int, tuple[NetStatus, str]]] = {}
        self._cpu = [0.0] * n_workers
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True, name=f"simworker-{i}")
                         for i in range(n_workers)]
        for t in self._threads:
            t.start()

    @classmethod
    def factory(cls, n_workers: int, *, curve: PlantedCurve | None = None,
                interval_s: float = 0.0) -> Callable[[ExecutionConfig, str | None, Sequence[str]], SimPool]:
        """A :class:`~orchestrator.driver.PoolFactory` that makes this pool (the config's pool settings,
        address and user code are not used: nothing trains)."""
        def make(ex: ExecutionConfig, address: str | None, py_modules: Sequence[str]) -> SimPool:
            return cls(n_workers, curve=curve, interval_s=interval_s)
        return make

    @property
    def worker_cpu_s(self) -> float:
        """CPU seconds the fake worker threads used so far (as of their last finished pack)."""
        with self._lock:
            return sum(self._cpu)

    # ------------------------------------------------------------------ the fake workers
    def _work(self, i: int) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            assert isinstance(job, PackJob)
            if not self._abort.is_set():
                self._emit(job, self.workers[i].worker)
            with self._lock:
                self._cpu[i] = time.thread_time()
            self._events.put(_End(job))

    def _emit(self, job: PackJob, worker: str) -> None:
        """One pack's reports, in order (see the module doc)."""
        t0 = time.perf_counter()
        d = job.dynamics
        width = {sp.net_id: sp.width for sp in job.networks}
        factor = {sp.net_id: self.curve.factor(sp.net_id) for sp in job.networks}
        running = [sp.net_id for sp in job.networks]
        pending: list[Retired] = []
        steps = [*range(0, d.steps, d.eval_every), d.steps]
        next_at = time.monotonic()
        for step in steps:
            if self._abort.is_set():
                return
            loss = self.curve.loss
            metrics = tuple(NetMetrics(nid, step, None if step == 0 else 0.98 * loss(width[nid], factor[nid], step),
                                       loss(width[nid], factor[nid], step)) for nid in running)
            done = step >= d.steps
            if done:
                for nid in running:
                    pending.append(self._final(nid, width[nid], factor[nid], steps, job))
                running = []
            self._events.put(PackEvent(job.pack_id, Report(step, metrics, tuple(pending), done), worker, 0,
                                time.perf_counter() - t0))
            pending = []
            if done:
                return
            # Retire requests land between reports, as in a real pack: retired now, reported at the next one.
            with self._lock:
                asked = self._retire.pop(job.pack_id, {})
            for nid, (status, reason) in asked.items():
                if nid in running:
                    running.remove(nid)
                    pending.append(Retired(nid, step, status, reason, loss(width[nid], factor[nid], step)))
            if not running:
                self._events.put(PackEvent(job.pack_id, Report(step, (), tuple(pending), True), worker, 0,
                                    time.perf_counter() - t0))
                return
            if self.interval_s:
                next_at += self.interval_s
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # the simulated training time of eval_every steps

    def _final(self, nid: int, width: int, factor: float, steps: Sequence[int], job: PackJob) -> Retired:
        """The network's end at the cap, with the engine's final-window estimate over its reports there."""
        d = job.dynamics
        cap = steps[-1]
        start = window_start(cap, d.stop_window)
        loss = self.curve.loss
        win = Window()
        for t in steps:
            if t >= start:  # earlier reports leave the engine's window before the cap anyway
                win.add(t, loss(width, factor, t), d.stop_window)
        est = win.estimate(window=d.stop_window, rel_tol=d.stop_rel_tol, z=d.stop_z)
        verdict = "converged" if est is not None and est.converged else "not converged"
        return Retired(nid, cap, NetStatus.FINISHED, f"step cap reached ({verdict})", loss(width, factor, cap), est)

    # ------------------------------------------------------------------ the contract
    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        with self._lock:
            self._retire.setdefault(pack_id, {})[net_id] = (NetStatus(status), reason)

    def run(self, jobs: Sequence[PackJob], on_event: Callable[[PackEvent], None],
            stop: threading.Event | None = None, on_done: OnDone | None = None,
            on_idle: OnIdle | None = None, on_wait: OnWait | None = None) -> list[JobFailure]:
        """Every job to its end (workers take them in order); events in the caller's thread. A stop ends the
        run at once: the packs under way stop at their next report and nothing more is delivered."""
        self._abort.clear()
        remaining = len(jobs)
        for job in jobs:
            self._jobs.put(job)
        while remaining:
            if stop is not None and stop.is_set():
                self._abort.set()
                while remaining:  # let the workers finish what they hold, unheard
                    if isinstance(self._events.get(), _End):
                        remaining -= 1
                return []
            try:
                item = self._events.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, PackEvent):
                on_event(item)
                continue
            assert isinstance(item, _End)
            remaining -= 1
            for more in on_done(item.job, None) if on_done is not None else ():
                self._jobs.put(more)
                remaining += 1
        return []

    def close(self) -> None:
        self._abort.set()
        for _ in self._threads:
            self._jobs.put(_STOP)
        for t in self._threads:
            t.join(timeout=10)
