"""Credentials stay out of everything mfsweep writes or prints.

URLs (the Optuna ``--storage``, the MLflow ``--tracking-uri``) are stored with their password removed and
printed with it masked. The database password reaches mfsweep from the environment or a file instead:
``MFSWEEP_STORAGE_PASSWORD``, or libpq's own ``PGPASSWORD`` / ``PGPASSFILE`` (read by the PostgreSQL driver
itself), so it is never on a command line, in a manifest's args, in the output folder or in MLflow.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote

PASSWORD_ENV = "MFSWEEP_STORAGE_PASSWORD"

_USERINFO = re.compile(r"(?P<head>^[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):(?P<pw>[^/?#]*)@")
_QUERY = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|secret|token)=)(?P<pw>[^&#]*)", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"([?&])(?:password|passwd|pwd|secret|token)=[^&#]*(&?)", re.IGNORECASE)


def has_password(url: str) -> bool:
    return bool(_USERINFO.search(url) or _QUERY.search(url))


def redact(url: str) -> str:
    """``url`` for display: any password masked (``postgresql://user:***@host/db``)."""
    return _QUERY.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>:***@", url))


def strip_password(url: str) -> str:
    """``url`` to store: any password removed (``postgresql://user@host/db``); the password comes from the
    environment when the URL is used again."""
    url = _USERINFO.sub(r"\g<head>@", url)
    url = _QUERY_PARAM.sub(lambda m: m.group(1) if m.group(2) else "", url)
    return url.replace("?&", "?")


def storage_password() -> str | None:
    """The storage password from ``MFSWEEP_STORAGE_PASSWORD`` (None: let libpq find PGPASSWORD/PGPASSFILE)."""
    return os.environ.get(PASSWORD_ENV) or None


def move_password_to_env(url: str, storage: bool) -> str:
    """A password given in a URL anyway, moved where its client reads it (``MFSWEEP_STORAGE_PASSWORD`` for the
    Optuna storage; ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` for an MLflow server, libpq's ``PGPASSWORD`` for
    an MLflow PostgreSQL store), so that nothing downstream ever holds it in a URL it could print or store.
    Returns the URL without it (unchanged when no client reads a password from the environment)."""
    m = _USERINFO.search(url)
    if m is None:
        return url
    user, password = unquote(m.group("head").split("://", 1)[1]), unquote(m.group("pw"))
    scheme = url.split(":", 1)[0].lower()
    if storage:
        os.environ[PASSWORD_ENV] = password
    elif scheme in ("http", "https"):
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
        return url.replace(m.group(0), m.group("head").split("://", 1)[0] + "://", 1)  # MLflow sends both
    elif scheme.startswith("postgres"):
        os.environ["PGPASSWORD"] = password
    else:
        return url  # masked wherever it is printed, stripped wherever it is stored
    return strip_password(url)


__all__ = ["PASSWORD_ENV", "has_password", "move_password_to_env", "redact", "storage_password", "strip_password"]
