"""A new SQLite MLflow store starts as a copy of a migrated template (orchestrator/tracking/sqlite_seed.py):
MLflow accepts it as its own, stores stay independent, nothing existing is ever replaced."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.tracking import Tracker
from orchestrator.tracking.sqlite_seed import seed_store, template_path


def schema(db: Path) -> tuple[str, list[str]]:
    with sqlite3.connect(db) as con:
        (rev,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
        tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    return rev, tables


def test_seeded_store_is_mlflows_own_and_stores_stay_independent(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFSWEEP_CACHE", str(tmp_path / "cache"))
    # Oracle: a store MLflow migrates itself.
    own = tmp_path / "own" / "mlflow.db"
    own.parent.mkdir()
    MlflowClient(f"sqlite:///{own}").search_experiments()

    a = tmp_path / "a" / "mlflow.db"
    with Tracker(f"sqlite:///{a}", "exp-a") as tr:
        parent = tr.start_parent("sweep", {}, {})
        kid = tr.start_child(parent, "w16/s00", "w16/s00", {"width": 16}, {})
        for step in range(5):
            tr.log_metrics(kid, {"test_loss": 1.0 / (1 + step)}, step)
        tr.end_run(kid)
        tr.end_run(parent)
    assert template_path().exists(), "the first store made the template"
    assert schema(a) == schema(own)

    client = MlflowClient(f"sqlite:///{a}")
    exp = client.get_experiment_by_name("exp-a")
    assert exp is not None and exp.artifact_location == (a.parent.resolve() / "mlartifacts").as_uri()
    hist = client.get_metric_history(kid, "test_loss")
    assert [(m.step, m.value) for m in hist] == [(s, 1.0 / (1 + s)) for s in range(5)]

    made = template_path().stat().st_mtime_ns
    b = tmp_path / "b" / "mlflow.db"
    with Tracker(f"sqlite:///{b}", "exp-b"):
        pass
    assert template_path().stat().st_mtime_ns == made, "later stores copy the template, not remake it"
    names = {e.name for e in MlflowClient(f"sqlite:///{b}").search_experiments()}
    assert names == {"Default", "exp-b"}, "the template never holds a store's own experiments"


def test_an_existing_store_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFSWEEP_CACHE", str(tmp_path / "cache"))
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not mine to touch")
    assert seed_store(db) is False
    assert db.read_bytes() == b"not mine to touch"


def test_an_unusable_cache_leaves_store_creation_to_mlflow(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("x")
    monkeypatch.setenv("MFSWEEP_CACHE", str(blocker))
    db = tmp_path / "s" / "mlflow.db"
    db.parent.mkdir()
    assert seed_store(db) is False and not db.exists()
    with Tracker(f"sqlite:///{db}", "fallback") as tr:
        run = tr.start_parent("sweep", {}, {})
        tr.end_run(run)
    assert MlflowClient(f"sqlite:///{db}").get_run(run).info.status == "FINISHED"
