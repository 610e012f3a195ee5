"""Processes of a local Ray cluster that outlive a killed driver.

A driver that starts Ray locally (no ``--address``) owns its processes: GCS, raylet, the dashboard and
runtime-env agents, the workers. Killed with SIGKILL it cannot stop them, and some (the agents) keep
running. So the driver records them in a per-user registry, and the next command that starts (any mfsweep
command on this host) stops those a dead driver left behind. A process is identified by its pid *and* its
start time (from /proc), so a recycled pid is never mistaken for one of them, and only processes that
descend from the recorded driver are ever recorded: other Ray clusters on the host are never touched.

Linux only (/proc); elsewhere the functions do nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

_PROC = Path("/proc")


def registry() -> Path:
    return Path(tempfile.gettempdir()) / f"mfsweep-{os.getuid()}" / "local-ray"


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of ``pid``, None if it is gone (or a zombie:
    dead, waiting for its parent to reap it)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for kid in children.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def _alive(pid: int, started: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] == started


def record_local_ray() -> None:
    """Record this driver and every process it started (call after ``ray.init``, and again as workers
    start); a no-op off Linux."""
    if not _PROC.is_dir():
        return
    me = os.getpid()
    st = _stat(me)
    if st is None:
        return
    procs = [[pid, s[1]] for pid in _descendants(me) if (s := _stat(pid)) is not None]
    path = registry() / f"{me}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"driver": [me, st[1]], "procs": procs}))
    os.replace(tmp, path)


def forget_local_ray() -> None:
    """This driver stopped its Ray itself: nothing to clean up."""
    with contextlib.suppress(OSError):
        (registry() / f"{os.getpid()}.json").unlink()


def reap_dead_drivers(say: Callable[[str], object]) -> int:
    """Stop the recorded processes of drivers that died without stopping their local Ray; ``say`` tells
    the user what was stopped. Returns the number of processes stopped."""
    folder = registry()
    if not _PROC.is_dir() or not folder.is_dir():
        return 0
    total = 0
    for path in folder.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
            driver, started = rec["driver"]
            procs = [(int(p), int(t)) for p, t in rec["procs"]]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not ours
        if _alive(driver, started):
            continue
        killed = 0
        for pid, t in procs:
            if _alive(pid, t):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        with contextlib.suppress(OSError):
            path.unlink()
        if killed:
            say(f"stopped {killed} Ray process(es) that a killed mfsweep driver (pid {driver}) left behind")
        total += killed
    return total


__all__ = ["forget_local_ray", "reap_dead_drivers", "record_local_ray", "registry"]
