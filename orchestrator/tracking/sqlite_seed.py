"""A new SQLite MLflow store starts as a copy of an empty, migrated one.

MLflow creates a SQLite store by running its whole chain of schema migrations (seconds, on the path from
the command to the first training step). The result depends only on MLflow's version, so it is made once per
version, through MLflow's own client, in a cache folder (``MFSWEEP_CACHE``, else ``$XDG_CACHE_HOME/mfsweep``,
else ``~/.cache/mfsweep``), and every later store starts as a copy of it; MLflow then verifies the copy's
schema revision as it would its own. Only MLflow's default experiment (id 0, which mfsweep never writes to)
remembers where the template was made. Without a writable cache, MLflow creates the store as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("MFSWEEP_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mfsweep"


def template_path() -> Path:
    import mlflow

    return cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"


def _make_template(path: Path) -> None:
    from mlflow import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".store-", suffix=".db", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # MLflow must find no file, or it would take the empty file for a store
    try:
        MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, path)  # atomic: a concurrent maker's copy is as good as ours
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def seed_store(db: Path) -> bool:
    """Make ``db`` a copy of the empty migrated store if it does not exist yet; False where it existed or
    the cache is unusable (MLflow then creates the store itself)."""
    if db.exists():
        return False
    try:
        template = template_path()
        if not template.exists():
            _make_template(template)
        fd, tmp = tempfile.mkstemp(prefix=f".{db.name}-", dir=db.parent)
        os.close(fd)
        try:
            shutil.copyfile(template, tmp)
            os.link(tmp, db)  # never replaces a store another process created meanwhile
        finally:
            os.unlink(tmp)
        return True
    except FileExistsError:
        return False
    except Exception as exc:  # an unwritable cache costs time, never the run
        log.debug("no MLflow store template (%s); MLflow creates %s itself", exc, db)
        return False
