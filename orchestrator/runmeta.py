"""What every driver records about the run it drives, and how it is stopped: the git commit and library
versions (tags of the MLflow parent run), the config flattened to MLflow params, and Ctrl-C / SIGTERM
turned into a stop event (the pool winds down, everything recorded so far is kept)."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["driver_host", "flatten", "git_commit", "stop_on_signals", "versions"]


def git_commit() -> str | None:
    """HEAD of the working directory's repository (None outside one)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip() or None
    except Exception:
        return None


def versions() -> dict[str, str]:
    """Python and the libraries whose versions change the numbers or the records."""
    # From package metadata: importing mlflow/optuna here would break the module boundaries.
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "ray", "optuna", "mlflow", "mfsweep"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "none"
    return out


def driver_host() -> str:
    import os

    return f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys (MLflow params); lists become their JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Ctrl-C / SIGTERM set ``stop`` while the block runs (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
