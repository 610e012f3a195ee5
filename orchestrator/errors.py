"""Errors the CLI turns into one-line messages, importable without mlflow or ray (their imports take
seconds, and the search and sweep drivers import them in a thread beside Ray's boot)."""

from __future__ import annotations


class TrackingError(RuntimeError):
    """MLflow tracking failed in a way the caller must hear about (one line: the problem and the fix)."""


class ServiceError(RuntimeError):
    """A service or the hardware a run needs cannot be used (no GPU for --device cuda, an unreachable Ray
    address): one line naming the fix, exit code 3."""
