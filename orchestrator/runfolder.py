"""The output folder of a run, for every command (scaling, search, resume): :class:`RunFolder` (its lock,
its ``state.json`` with passwords stripped, its resolved config) and one driver per folder.

The lock is ``<out>/driver.lock``, taken before anything else in the folder is written:

* ``flock`` on it: the kernel releases it the moment its driver dies (even by SIGKILL), so on one host a
  second driver is refused and a dead driver's lock is free at once;
* inside it, the holder's host, pid and a lease renewed every ``LEASE_S / 4`` s by a thread: on shared
  volumes whose ``flock`` does not reach across hosts (many NFS setups), a driver on another host is
  refused while its lease is fresh and taken over once the lease has run out (its host is gone).

A lock that is taken over is said so, with the previous holder. The second driver gets one line naming the
holder (exit 2 in the CLI).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .config import ConfigError
from .credentials import strip_password

log = logging.getLogger(__name__)

LOCK_NAME = "driver.lock"
LEASE_S = 60.0


class FolderBusy(ConfigError):
    """Another live driver holds the output folder."""


# Folders this process holds (re-entry from nested callers is allowed: the CLI and the sweep both lock).
_held: dict[Path, int] = {}
_held_lock = threading.Lock()


def _read(fh: IO[str]) -> dict[str, Any]:
    fh.seek(0)
    try:
        rec = json.loads(fh.read() or "{}")
    except json.JSONDecodeError:
        return {}  # torn by a writer killed mid-write: no live lease in it
    return rec if isinstance(rec, dict) else {}


def _write(fh: IO[str], rec: dict[str, Any]) -> None:
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps(rec))
    fh.flush()
    os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host (a flock that did not stop a live driver: e.g. NFS without locks)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(rec: dict[str, Any]) -> str:
    return f"{rec.get('command', 'mfsweep')} on host {rec.get('host', '?')}, pid {rec.get('pid', '?')}"


@contextlib.contextmanager
def hold(out: Path, command: str) -> Iterator[None]:
    """Hold ``out`` for this driver while the block runs; raise :class:`FolderBusy` if a live driver does."""
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    with _held_lock:
        if key in _held:
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    fh = (out / LOCK_NAME).open("a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        rec = _read(fh)
        fh.close()
        raise FolderBusy(f"{out} is in use by another driver ({_describe(rec)}); wait for it to end, or pass "
                         "another --out") from None
    host = socket.gethostname()
    try:
        prev = _read(fh)
        age = time.time() - float(prev.get("renewed", 0))
        if prev.get("pid") is not None and age < float(prev.get("lease_s", LEASE_S)) and (
                prev.get("host") != host or _pid_alive(int(prev["pid"]))):
            raise FolderBusy(f"{out} is in use by another driver ({_describe(prev)}, lease renewed {age:.0f} s "
                             f"ago); wait for it to end, or pass another --out (a dead driver's lease runs out "
                             f"{LEASE_S:.0f} s after its last renewal)")
        if prev.get("pid") is not None:
            log.warning("took over %s from a driver that is gone (%s)", out, _describe(prev))
        rec = {"host": host, "pid": os.getpid(), "command": command, "started": time.time(),
               "renewed": time.time(), "lease_s": LEASE_S}
        _write(fh, rec)
    except BaseException:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
        raise
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 4):
            with contextlib.suppress(OSError):
                _write(fh, {**rec, "renewed": time.time()})

    renewer = threading.Thread(target=renew, name="runfolder-lease", daemon=True)
    renewer.start()
    with _held_lock:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_lock:
            _held.pop(key, None)
        stop.set()
        renewer.join(timeout=5)
        with contextlib.suppress(OSError):
            _write(fh, {})  # released: nothing to take over
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


class RunFolder:
    """An output folder as every driver uses it: ``hold`` it first (one driver at a time), then write its
    state (what a resume needs: keys, study, where MLflow and Optuna live) and its resolved config."""

    STATE = "state.json"
    #: State entries that are URLs: stored without their password (it comes from the environment again).
    URL_KEYS = ("tracking_uri", "storage")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def state(self) -> dict[str, Any]:
        """The stored state ({} for a new folder)."""
        p = self.path / self.STATE
        return json.loads(p.read_text()) if p.exists() else {}

    def default_tracking_uri(self) -> str:
        """MLflow in a SQLite file inside the folder (absolute: the driver may change directory)."""
        return f"sqlite:///{(self.path / 'mlflow.db').resolve()}"

    def hold(self, command: str) -> contextlib.AbstractContextManager[None]:
        return hold(self.path, command)

    def write_state(self, state: dict[str, Any]) -> None:
        """``state.json``, URL entries password-free (a held folder: only its driver writes here)."""
        clean = {k: strip_password(v) if k in self.URL_KEYS and isinstance(v, str) else v
                 for k, v in state.items()}
        (self.path / self.STATE).write_text(json.dumps(clean, indent=1))

    def write_config(self, name: str, text: str) -> Path:
        """The resolved config the run uses (what ``mfsweep resume`` reads back)."""
        path = self.path / name
        path.write_text(text)
        return path


__all__ = ["LEASE_S", "LOCK_NAME", "FolderBusy", "RunFolder", "hold"]
