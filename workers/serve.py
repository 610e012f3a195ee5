"""The local pool's worker process: a :class:`~workers.runner.PackRunner` in a child of the driver, driven
over a pipe (the driver's side is :mod:`orchestrator.localworker`).

Lockstep: the child computes a pack's next report only when the driver asks for it (``next``), as when the
runner's generator ran in the driver's own thread. So a retire request sent with ``next`` lands at the very
next report, and a driver that stops asking (``stop``) leaves the pack closed at a report, its log synced.

Messages, driver -> child: ``("train", job)``, ``("next", [retire args])``, ``("stop", None)``,
``("close", None)``. Child -> driver: ``("ready", WorkerInfo)`` or ``("failed", reason)`` once at start; then
per job ``("event", PackEvent)`` ... and one of ``("end", None)``, ``("raised", reason)``, ``("stopped", None)``.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import Connection

from .jobs import PackJob
from .runner import PackRunner


def reason_of(err: BaseException) -> str:
    """How a pack's own error is named in its failure (the same text in-process or from the child)."""
    return f"{type(err).__name__}: {err}"


def serve(conn: Connection, device: str) -> None:
    """The child's main loop; returns (the process exits) on ``close`` or when the driver is gone."""
    # Ctrl-C reaches the whole process group: the driver handles it, and stops this child between reports.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        runner = PackRunner(device)
        conn.send(("ready", runner.info()))
    except Exception as err:
        conn.send(("failed", reason_of(err)))
        return
    try:
        while True:
            op, arg = conn.recv()
            if op == "close":
                return
            if op == "train":
                _train(conn, runner, arg)
    except (EOFError, OSError):
        return  # the driver exited or was killed: nothing is left to train for


def _train(conn: Connection, runner: PackRunner, job: PackJob) -> None:
    gen = runner.train(job)
    try:
        while True:
            try:
                event = next(gen)
            except StopIteration:
                conn.send(("end", None))
                return
            except Exception as err:
                conn.send(("raised", reason_of(err)))
                return
            conn.send(("event", event))
            op, arg = conn.recv()
            if op == "stop":
                gen.close()  # the report log is closed before the driver hears back
                conn.send(("stopped", None))
                return
            for retire in arg:
                runner.request_retire(*retire)
    finally:
        gen.close()


__all__ = ["reason_of", "serve"]
