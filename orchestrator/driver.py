"""What every command's driver does around its policy (``mfsweep scaling``, ``mfsweep search``): open the
worker pool while the tracker starts, tag the parent run with where the numbers came from, show progress,
close the tracker without hiding the error that ended the run.

The policies themselves (:mod:`.scaling`, :mod:`.search`) decide what to run next and what a network's end
means; the reports go through :mod:`.ledger`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import ExecutionConfig, TaskConfig
from .pool import Pool, make_pool, open_beside
from .runmeta import driver_host, git_commit, versions
from .userdata import modules_for_workers

__all__ = ["Interrupted", "PoolFactory", "close_tracker", "config_pool", "open_pool", "progress_bar", "run_tags"]


class Interrupted(RuntimeError):
    """The run was stopped (Ctrl-C / SIGTERM) before it finished; it can be resumed."""


class PoolFactory(Protocol):
    """Makes a command's worker pool: :func:`config_pool` (what the config asks for) unless a caller passes
    another, e.g. :class:`orchestrator.simpool.SimPool` to drive a sweep without training (bench/scale.py)."""

    def __call__(self, ex: ExecutionConfig, address: str | None, py_modules: Sequence[str]) -> Pool: ...


def config_pool(ex: ExecutionConfig, address: str | None, py_modules: Sequence[str]) -> Pool:
    """The pool ``ex`` asks for (``py_modules``: user code to ship to its workers)."""
    return make_pool(
        ex.backend, address=address, device=ex.device, workers=ex.workers, cpus_per_worker=ex.cpus_per_worker,
        max_retries=ex.max_retries, max_workers=ex.max_workers, wait_for_workers_s=ex.wait_for_workers_s,
        py_modules=py_modules)


def open_pool(ex: ExecutionConfig, address: str | None, tasks: Iterable[TaskConfig],
              side: Callable[[], object], factory: PoolFactory = config_pool) -> Pool | None:
    """The pool ``factory`` makes for ``ex`` (the user code ``tasks`` need shipped to its workers), made while
    ``side`` (the tracker's start) runs in another thread."""
    code = modules_for_workers(tasks)
    return open_beside(lambda: factory(ex, address, code), side)


def run_tags(kind: str, key: str, out: Path) -> dict[str, str]:
    """The parent run's provenance: which run, which code and libraries, which host and folder."""
    return {"mfsweep.sweep_key": key, "mfsweep.kind": kind, "mfsweep.git_commit": git_commit() or "none",
            "mfsweep.out": str(out.resolve()), "mfsweep.driver_host": driver_host(),
            **{f"version.{k}": v for k, v in versions().items()}}


def progress_bar(console: Console, show: bool, counter: str) -> Progress:
    """A bar with an ETA and a ``counter`` field (e.g. 'networks': '3/12 networks')."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        TextColumn(f"{{task.fields[{counter}]}} {counter}"), TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not show, transient=False)


class _Closable(Protocol):
    def close(self) -> None: ...


def close_tracker(tracker: _Closable | None, console: Console) -> None:
    """Flush and close the tracker; its error is printed, so that the run's own error (if any) stays the
    one raised."""
    if tracker is None:
        return
    try:
        tracker.close()
    except Exception as err:
        console.print(f"[red]MLflow: {err}[/]", soft_wrap=True)
