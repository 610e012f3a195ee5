"""Shared fixtures: a throwaway PostgreSQL server (real, from Debian's packages) and free ports."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Test-sized tensors: one intra-op thread is faster and steadier on a 2-core machine (and leaves the
    # other core to the Ray workers and servers the tests start).
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # The MLflow store template (orchestrator/tracking/sqlite_seed.py) goes to a folder of the test session,
    # not the user's ~/.cache; commands the tests start inherit it.
    before = os.environ.get("MFSWEEP_CACHE")
    os.environ["MFSWEEP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MFSWEEP_CACHE", None)
        else:
            os.environ["MFSWEEP_CACHE"] = before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _missing(reason: str) -> None:
    # In CI a missing server is a failure, not a skip: .ci/run installs PostgreSQL.
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must install postgresql: see .ci/run)")
    pytest.skip(reason)


@contextlib.contextmanager
def pg_cluster(password: str | None = None) -> Iterator[str]:
    """A PostgreSQL server of its own; yields ``postgresql://postgres@127.0.0.1:PORT``. With ``password``
    the server demands it (scram-sha-256) and the URL carries none: clients must find it elsewhere."""
    bindir = _pg_bin()
    if bindir is None:
        _missing("PostgreSQL binaries not found (apt-get install -y postgresql)")
        return
    tmp = Path(tempfile.mkdtemp(prefix="mfsweep-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    data.mkdir()
    sock.mkdir()
    auth = ["--auth=trust"]
    if password is not None:
        pwfile = tmp / "pw"
        pwfile.write_text(password + "\n")
        auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
    run_as: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the 'postgres' system user
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root and no 'postgres' user to run the server")
            return
        for p in (tmp, data, sock, *([tmp / "pw"] if password is not None else [])):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        # runuser lives in /usr/sbin, which a non-login PATH may lack.
        runuser = shutil.which("runuser") or next(
            (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None)
        if runuser is None:
            _missing("running as root and no 'runuser' to start the server as 'postgres' (util-linux)")
            return
        run_as = [runuser, "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", *auth,
                    "-E", "UTF8"], check=True, capture_output=True)
    log = tmp / "server.log"
    if run_as:
        log.touch()
        os.chown(log, pw.pw_uid, pw.pw_gid)
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                    f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Base URL ``postgresql://postgres@127.0.0.1:PORT`` of a server started for this test session
    (or MFSWEEP_TEST_PG_URL, a server URL whose user may create databases)."""
    env_url = os.environ.get("MFSWEEP_TEST_PG_URL")
    if env_url:
        yield env_url.rstrip("/")
        return
    with pg_cluster() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_db(postgres_server: str) -> Callable[[str], str]:
    """``make(name)`` creates a fresh database and returns its SQLAlchemy URL."""
    import psycopg2

    def make(name: str) -> str:
        name = f"{name}_{int(time.time() * 1000) % 10**9}"
        conn = psycopg2.connect(f"{postgres_server}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"{postgres_server}/{name}"

    return make
