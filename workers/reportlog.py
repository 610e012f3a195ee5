"""A checkpointed pack's report log: every report the pack emitted, one JSON line each, beside its checkpoint
(``<checkpoint>.reports.jsonl``).

Why a log and not the checkpoint: the checkpoint holds the pack's state only, so saving and restoring it
cost the same after ten reports or ten thousand, and a restarted worker simply continues. The reports are
needed again in one case only: a driver killed before it recorded what it had received (MLflow points still
queued, a network's end not yet in results.jsonl). ``mfsweep resume`` therefore re-sends every pack's log
(:func:`read_events`) before the packs run again; the driver drops what it has already seen and the tracker
what MLflow already holds. A worker lost under a live driver needs nothing from the log: that driver saw every
report, and the reports the pack trains again past its checkpoint are dropped as seen.

Invariants (kept by :class:`ReportLog`, the worker's writer): a report's line is appended before the report
leaves the worker; the log is flushed and fsynced before a checkpoint is renamed into place, and that
checkpoint records the log's length (:data:`LOG_BYTES`); a worker resuming from it cuts the log back to that
length before appending. So the log holds each report once, in order, and covers at least its checkpoint;
only its last line can be torn (a worker killed mid-write), and readers stop there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from .engine import Report
from .engine.reports import report_from_json, report_to_json
from .jobs import PackEvent

LOG_BYTES = "report_log_bytes"
"""Key of :attr:`Pack.checkpoint_extra`: the length of the report log the checkpoint covers."""


def log_path(checkpoint: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(checkpoint)}.reports.jsonl")


class ReportLog:
    """The worker's side: append one line per report; :meth:`sync` before each checkpoint."""

    def __init__(self, checkpoint: str | os.PathLike[str], keep_bytes: int) -> None:
        """Open the log of ``checkpoint``, cut to its first ``keep_bytes`` bytes (0: a fresh pack's)."""
        self.path = log_path(checkpoint)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        size = self._fh.seek(0, os.SEEK_END)
        self._fh.truncate(min(size, keep_bytes))  # lines past the checkpoint: the pack emits them again
        self._fh.seek(0, os.SEEK_END)

    def append(self, ev: PackEvent) -> None:
        line = {"worker": ev.worker, "from": ev.resumed_from, "wall_s": ev.wall_s, **report_to_json(ev.report)}
        self._fh.write(json.dumps(line, separators=(",", ":")).encode() + b"\n")

    def sync(self) -> int:
        """Make every appended line durable; returns the log's length, for the checkpoint that follows."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()


def read_events(checkpoint: str | os.PathLike[str], pack_id: str) -> list[PackEvent]:
    """The reports a pack emitted, in order, from its log (a torn last line is left out). A checkpoint written
    before the log existed (format 1) still holds them, and they are read from there."""
    path = log_path(checkpoint)
    out: list[PackEvent] = []
    if path.exists():
        with path.open("rb") as fh:
            for raw in fh:
                try:
                    d = json.loads(raw)
                    rep = report_from_json(d)
                except (ValueError, KeyError, TypeError, IndexError):
                    break  # torn by a worker killed mid-write: nothing valid follows it
                out.append(PackEvent(pack_id, rep, d["worker"], d["from"], d["wall_s"]))
    elif Path(checkpoint).exists():
        out = [PackEvent(pack_id, rep, "", 0, 0.0) for rep in _legacy(checkpoint)]
    return out


def _legacy(checkpoint: str | os.PathLike[str]) -> list[Report]:
    from .engine import Pack  # torch: only format-1 checkpoints need it

    return Pack.legacy_history(checkpoint) or []


__all__ = ["LOG_BYTES", "ReportLog", "log_path", "read_events"]
