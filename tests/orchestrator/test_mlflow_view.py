"""The MLflow view of a sweep, read back from the store: the experiment opens as a model-training one, the
parent run carries the error-vs-width curves as metrics (step = width, value = the mean in summary.json),
runs are named after what they are, and the parent's description states the fitted exponents."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.mlflow_view import curve_key
from orchestrator.tracking import Tracker

SMALL = ["name=viewsweep", "task.kind=teacher", "task.dim=8", "sweep.widths=[8,16,32]", "sweep.seeds=2",
         "dynamics.steps=40", "dynamics.eval_every=20", "dynamics.batch_size=64", "task.n_test=256",
         "sweep.variants=[{name: sgd}, {name: bd-clone, set: {dynamics.birth_death.rate: 5.0}}]"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("view") / "run"
    args = ["scaling", "--out", str(out), "--no-progress", "--backend", "local"]
    for s in SMALL:
        args += ["--set", s]
    assert main(args) == 0
    return out


def _client(out: Path) -> tuple[MlflowClient, dict]:
    summary = json.loads((out / "summary.json").read_text())
    return MlflowClient(summary["mlflow"]["tracking_uri"]), summary


def test_experiment_is_a_model_training_one(sweep: Path) -> None:
    client, summary = _client(sweep)
    exp = client.get_experiment(summary["mlflow"]["experiment_id"])
    assert exp.name == "viewsweep"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "loss_vs_width" in exp.tags["mlflow.note.content"]


def test_loss_vs_width_histories_equal_summary_means(sweep: Path) -> None:
    client, summary = _client(sweep)
    parent = summary["mlflow"]["parent_run_id"]
    assert [v["name"] for v in summary["variants"]] == ["sgd", "bd-clone"]
    for v in summary["variants"]:
        expected: dict[int, float] = {}
        for w in (8, 16, 32):
            losses = [p["test_loss"] for p in v["points"] if p["width"] == w and p["status"] == "finished"]
            assert len(losses) == 2
            expected[w] = statistics.fmean(losses)
        hist = client.get_metric_history(parent, curve_key(v["name"]))
        assert sorted(m.step for m in hist) == [8, 16, 32]
        got = {m.step: m.value for m in hist}
        assert got == pytest.approx(expected, rel=1e-12)
    # Characters MLflow refuses in metric names are spelled '_' (variant names cannot have them anyway).
    assert curve_key("bd+clone*") == "loss_vs_width/bd_clone_"


def test_run_names_and_description(sweep: Path) -> None:
    client, summary = _client(sweep)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert re.fullmatch(r"viewsweep sweep \d{4}-\d\d-\d\d \d\d:\d\d", parent.info.run_name)
    children = client.search_runs([summary["mlflow"]["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 12
    names = set()
    for run in children:
        p = run.data.params
        assert run.info.run_name == f"{p['variant']} width={p['width']} seed={p['replicate']}"
        names.add(run.info.run_name)
    assert len(names) == 12
    note = parent.data.tags["mlflow.note.content"]
    # The description carries each variant's verdict as summary.json states it (here: time-limited, so
    # no exponent is claimed), and the counts of finished and converged networks.
    n_conv = 0
    for v in summary["variants"]:
        assert f"**{v['name']}**: {v['verdict']}" in note
        n_conv += v["n_converged"]
    assert f"12 of 12 networks finished, {n_conv} converged" in note


def test_older_experiment_gets_the_kind_tag_and_keeps_its_own(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    genai = client.create_experiment("genai", artifact_location=(tmp_path / "b").as_uri(),
                                     tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "genai"):
        Tracker(uri, name).close()
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(genai).tags["mlflow.experimentKind"] == "genai_development"  # a user's choice


def test_done_line_names_the_page_that_opens_on_the_runs(sweep: Path) -> None:
    """The last line of a sweep tells the user the command and the page; the page selects MLflow's
    model-training view (its UI ignores the experiment's kind tag and would open on GenAI traces)."""
    from orchestrator.cli import _browse_hint

    summary = json.loads((sweep / "summary.json").read_text())
    hint = _browse_hint(sweep, None)
    assert f"sqlite:///{(sweep / 'mlflow.db').resolve()}" in hint
    assert hint.endswith(f"/#/experiments/{summary['mlflow']['experiment_id']}?workflowType=machine_learning")
    assert _browse_hint(sweep, "http://user:secret@mlflow.example:5000/").endswith(
        f"http://user:***@mlflow.example:5000/#/experiments/{summary['mlflow']['experiment_id']}"
        "?workflowType=machine_learning")
