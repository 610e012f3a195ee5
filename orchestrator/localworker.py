"""The local pool's worker: a child process of the driver that trains packs (:mod:`workers.serve` is its side).

Why a process and not a thread: torch's import and the training run beside the driver's own start (MLflow's
import and store, planning) on another core instead of taking turns with it for the GIL, which is what lets
a local sweep reach its first training step in a few seconds; and a worker killed (out of memory, a crash in
native code) costs a restart from the pack's checkpoint, not the driver. :func:`prewarm` starts it as early as
the command knows it will be needed, before the driver's own imports.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import threading
from collections.abc import Generator
from typing import Any

from workers.jobs import PackEvent, PackJob, WorkerInfo
from workers.serve import serve

_CLOSE_WAIT_S = 10.0


class WorkerLost(Exception):
    """The worker process died (killed, out of memory, a native crash): the pack was not at fault."""


class WorkerRaised(Exception):
    """A pack's own error inside the worker; its text is the failure's reason."""


class WorkerStartFailed(Exception):
    """The worker could not start (e.g. no GPU for ``cuda``); its text names the cause."""


class WorkerProcess:
    """One worker process, driven in lockstep (one report per request; see :mod:`workers.serve`)."""

    def __init__(self, device: str) -> None:
        self.device = device
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no copy of the driver's threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve, args=(child, device), name="mfsweep-local-worker", daemon=True)
        self._proc.start()
        child.close()
        self._info: WorkerInfo | None = None
        self._lock = threading.Lock()
        self._retires: list[tuple[str, int, str, str]] = []

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def info(self) -> WorkerInfo:
        """What the worker is (waits for its start: torch's import)."""
        if self._info is None:
            try:
                op, arg = self._recv()
            except WorkerLost as err:
                raise WorkerStartFailed(str(err)) from None
            if op != "ready":
                raise WorkerStartFailed(arg)
            self._info = arg
        return self._info

    def request_retire(self, pack_id: str, net_id: int, status: str, reason: str) -> None:
        """Delivered with the next report's request, so it lands at that report (any thread may call)."""
        with self._lock:
            self._retires.append((pack_id, net_id, status, reason))

    def train(self, job: PackJob) -> Generator[PackEvent, None, None]:
        """The job's reports; raises :class:`WorkerRaised` for the pack's own error, :class:`WorkerLost` when
        the process died. Closing the generator early stops the pack at its current report."""
        self.info()
        self._send(("train", job))
        pending = True  # the child is inside this job
        try:
            while True:
                op, arg = self._recv()
                if op == "event":
                    yield arg
                    with self._lock:
                        retires, self._retires = self._retires, []
                    self._send(("next", retires))
                    continue
                pending = False
                if op == "raised":
                    raise WorkerRaised(arg)
                return  # "end"
        except WorkerLost:
            pending = False
            raise
        finally:
            if pending:  # closed at a report: the child waits for a request
                with contextlib.suppress(WorkerLost):  # dead meanwhile: nothing left to stop
                    self._send(("stop", None))
                    while self._recv()[0] != "stopped":
                        pass

    def close(self) -> None:
        with contextlib.suppress(WorkerLost):
            self._send(("close", None))
        self._proc.join(_CLOSE_WAIT_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()

    def _send(self, msg: tuple[str, Any]) -> None:
        try:
            self._conn.send(msg)
        except OSError:
            raise WorkerLost(self._death()) from None

    def _recv(self) -> tuple[str, Any]:
        try:
            msg: tuple[str, Any] = self._conn.recv()
            return msg
        except (EOFError, OSError):
            raise WorkerLost(self._death()) from None

    def _death(self) -> str:
        self._proc.join(1.0)
        code = self._proc.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the local worker process (pid {self.pid}) was killed by {name}{hint}"
        return f"the local worker process (pid {self.pid}) exited with code {code}"


_warm: WorkerProcess | None = None
_warm_lock = threading.Lock()


def prewarm(device: str) -> WorkerProcess:
    """Start the worker now, so that torch loads while the driver starts; :func:`take` hands it out."""
    global _warm
    with _warm_lock:
        if _warm is None:
            _warm = WorkerProcess(device)
        return _warm


def take(device: str) -> WorkerProcess:
    """The prewarmed worker when it is for ``device`` and alive, else a new one."""
    global _warm
    with _warm_lock:
        warm, _warm = _warm, None
    if warm is not None:
        if warm.device == device and warm.alive():
            return warm
        warm.close()
    return WorkerProcess(device)


__all__ = ["WorkerLost", "WorkerProcess", "WorkerRaised", "WorkerStartFailed", "prewarm", "take"]
