"""The worker around the engine: trains packs and streams their reports.

:class:`PackRunner` is a plain class: :mod:`workers.actor` makes it a Ray actor, :mod:`workers.serve` runs it
in the local pool's child process. It does not import Ray (a second of CPU on the local worker's way to its
first step); it uses Ray only where Ray runs it, through :func:`_ray`.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .engine import NetStatus

if TYPE_CHECKING:
    from .engine import Pack
from .jobs import PackEvent, PackJob, WorkerInfo
from .reportlog import LOG_BYTES, ReportLog, read_events


def _ray() -> Any:
    """Ray's module where this process runs under Ray (an actor's worker process has it loaded), else None."""
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


class PackRunner:
    """Trains packs on one device. Invariant: a job whose checkpoint exists resumes from it."""

    def __init__(self, device: str = "auto", threads: int | None = None, slots_per_node: int = 1) -> None:
        # torch loads here, in the worker: the driver, which only creates actors, starts without it.
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("execution.device=cuda but this worker sees no GPU; use --device cpu or auto")
        self.device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        self.slots_per_node = max(1, slots_per_node)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        # Retire requests (e.g. Optuna pruning) arrive on another actor thread while a pack trains.
        self._lock = threading.Lock()
        self._retire: dict[str, dict[int, tuple[NetStatus, str]]] = {}

    def request_retire(self, pack_id: str, net_id: int, status: str = "pruned", reason: str = "pruned") -> None:
        """Ask the pack ``pack_id`` to drop ``net_id`` at its next report; its pack-mates go on."""
        with self._lock:
            self._retire.setdefault(pack_id, {})[net_id] = (NetStatus(status), reason)

    def _apply_retires(self, pack_id: str, pack: Pack) -> None:
        with self._lock:
            todo = self._retire.pop(pack_id, {})
        running = set(pack.running)
        for net_id, (status, reason) in todo.items():
            if net_id in running:
                pack.retire(net_id, status, reason)

    def info(self) -> WorkerInfo:
        if self.device.type == "cuda":
            import torch

            mem = torch.cuda.get_device_properties(self.device).total_memory
        else:
            mem = _ram_bytes() // self.slots_per_node
        ray = _ray()
        node = ray.get_runtime_context().get_node_id() if ray is not None else socket.gethostname()
        return WorkerInfo(self.name, node, str(self.device), int(mem))

    def train(self, job: PackJob) -> Generator[PackEvent, None, None]:
        """Train ``job`` to the end, yielding every report; checkpoint every ``checkpoint_every`` steps. A job
        whose checkpoint exists continues from it, without replaying what it reported before: each report
        also goes to the pack's report log (:mod:`workers.reportlog`), which a resumed driver reads."""
        import torch

        from .engine import Pack

        t0 = time.perf_counter()
        ck = Path(job.checkpoint) if job.checkpoint else None
        # A dataset's arrays arrive as an object-store reference (Ray) or as the arrays (local pool).
        ray = _ray()
        data = ray.get(job.data) if ray is not None and isinstance(job.data, ray.ObjectRef) else job.data
        log: ReportLog | None = None
        if ck is not None and ck.exists():
            pack = Pack.load(ck, device=self.device, kernel=job.kernel, precision=job.precision, data=data)
            pack.extend(job.dynamics)  # a finished sweep continued to more steps (mfsweep resume --set)
            covered = pack.checkpoint_extra.get(LOG_BYTES)
            log = ReportLog(ck, 0 if covered is None else covered)
            if covered is None:  # a format-1 checkpoint held its reports: they start the log
                for old in Pack.legacy_history(ck) or []:
                    log.append(PackEvent(job.pack_id, old, self.name, 0, 0.0))
        else:
            pack = Pack(job.task, job.model, job.dynamics, job.networks, data_seed=job.data_seed,
                        device=self.device, dtype=getattr(torch, job.dtype), kernel=job.kernel,
                        precision=job.precision, data=data)
            log = None if ck is None else ReportLog(ck, 0)
        start = pack.step
        last_saved = start
        if log is not None and ck is not None and job.resend_after is not None:
            # Reports the lost worker emitted (and checkpointed) that never reached the driver; it drops
            # any it did receive by step.
            for old_ev in read_events(ck, job.pack_id):
                if old_ev.report.step > job.resend_after:
                    yield old_ev
        try:
            for report in pack.train():
                ev = PackEvent(job.pack_id, report, self.name, start, time.perf_counter() - t0)
                if log is not None:
                    log.append(ev)
                if ck is not None and log is not None and (
                        report.done or report.step - last_saved >= job.checkpoint_every):
                    # The log first, then the state that covers it; both before the report leaves, so that
                    # whatever the driver has seen is covered by a checkpoint.
                    pack.save(ck, extra={LOG_BYTES: log.sync()})
                    last_saved = report.step
                yield ev
                self._apply_retires(job.pack_id, pack)
        finally:
            if log is not None:
                log.close()

    def ping(self) -> str:
        return self.name
