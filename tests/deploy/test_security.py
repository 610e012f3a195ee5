"""The claims of deploy/README.md's SECURITY section that code (not configuration) must keep true."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.config import ConfigError, load
from orchestrator.credentials import PASSWORD_ENV
from workers.engine import Pack

from .support import ROOT


class _Payload:
    """Pickles to a call of Path.touch: what a tampered checkpoint would smuggle into a worker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path(str(self.marker)).touch, ())  # type: ignore[return-value]


def test_a_tampered_checkpoint_cannot_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ck = tmp_path / "p0000.pt"
    torch.save({"format": 1, "meta": "{}", "evil": _Payload(marker)}, ck)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        Pack.load(ck)
    assert not marker.exists()  # torch.load(weights_only=True) refused the pickled callable


@pytest.mark.parametrize("name", ["x; rm -rf /", "a'b", "a b", "$(id)", "../etc"])
def test_names_that_become_paths_experiments_and_studies_are_plain(name: str) -> None:
    with pytest.raises(ConfigError, match="name"):
        load(None, [f"name={name}"])


def _mfsweep(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PGPASSWORD", "PGPASSFILE", PASSWORD_ENV)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**base, "OMP_NUM_THREADS": "1", **env}, timeout=600)


@pytest.mark.postgres
def test_the_storage_password_is_written_nowhere(tmp_path: Path) -> None:
    """A search on a PostgreSQL that demands a password (scram-sha-256): it reaches mfsweep from
    MFSWEEP_STORAGE_PASSWORD or libpq's PGPASSWORD, and even when given in --storage it appears nowhere under
    the output folders (state, journal, MLflow store and artifacts) nor in the driver's output."""
    from tests.conftest import pg_cluster
    from tests.orchestrator.test_search import write_cfg

    password = "pw-" + secrets.token_hex(12)
    cfg = write_cfg(tmp_path, trials=2, parallel=2)
    with pg_cluster(password=password) as server:
        url = f"{server}/postgres"  # no password in it
        a, b = tmp_path / "env", tmp_path / "inline"
        runs = [
            _mfsweep(["search", str(cfg), "--storage", url, "--study", "a", "--out", str(a), "--no-progress"],
                     {PASSWORD_ENV: password}),
            _mfsweep(["resume", str(a), "--no-progress"], {"PGPASSWORD": password}),  # libpq's own variable
            # Given in the URL anyway: used, warned about, stored and printed without it.
            _mfsweep(["search", str(cfg), "--storage", url.replace("postgres@", f"postgres:{password}@"),
                      "--study", "b", "--out", str(b), "--no-progress"], {}),
        ]
        for r in runs:
            assert r.returncode == 0, r.stdout + r.stderr
        assert "visible to every user" in runs[2].stderr
        for out in (a, b):
            state = json.loads((out / "state.json").read_text())
            assert state["storage"] == url  # what resume needs, minus the password
        # Without the password the server refuses: one line naming where it should come from, exit 3.
        denied = _mfsweep(["resume", str(a), "--no-progress"], {})
        assert denied.returncode == 3, denied.stdout + denied.stderr
        errors = [ln for ln in denied.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and PASSWORD_ENV in errors[0], denied.stderr
        runs.append(denied)
    secret = password.encode()
    files = [p for out in (a, b) for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any(p.name == "state.json" for p in files)
    for p in files:
        assert secret not in p.read_bytes(), f"password found in {p}"
    for r in runs:
        assert password not in r.stdout and password not in r.stderr


@pytest.mark.parametrize(("url", "shown", "stored"), [
    ("postgresql+psycopg://optuna:s3cr%40t@db:5432/optuna", "postgresql+psycopg://optuna:***@db:5432/optuna",
     "postgresql+psycopg://optuna@db:5432/optuna"),
    ("postgresql://u:a@b@db/x", "postgresql://u:***@db/x", "postgresql://u@db/x"),  # an unescaped @ in it
    ("postgresql://db/x?sslmode=require&password=s3", "postgresql://db/x?sslmode=require&password=***",
     "postgresql://db/x?sslmode=require"),
    ("postgresql://optuna@db/optuna", "postgresql://optuna@db/optuna", "postgresql://optuna@db/optuna"),
    ("http://mlflow:5000", "http://mlflow:5000", "http://mlflow:5000"),
])
def test_urls_are_shown_masked_and_stored_without_password(url: str, shown: str, stored: str) -> None:
    from orchestrator.credentials import redact, strip_password

    assert redact(url) == shown
    assert strip_password(url) == stored


def test_a_password_in_a_url_moves_to_where_its_client_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.credentials import move_password_to_env

    for var in (PASSWORD_ENV, "PGPASSWORD", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    assert move_password_to_env("postgresql://optuna:p%40ss@db/o", storage=True) == "postgresql://optuna@db/o"
    assert os.environ[PASSWORD_ENV] == "p@ss"
    assert move_password_to_env("postgresql://mlflow:pw2@db/m", storage=False) == "postgresql://mlflow@db/m"
    assert os.environ["PGPASSWORD"] == "pw2"
    assert move_password_to_env("https://bob:pw3@mlflow.example/", storage=False) == "https://mlflow.example/"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "pw3")
    assert move_password_to_env("http://mlflow:5000", storage=False) == "http://mlflow:5000"
