"""``mfsweep search`` end to end on real components: Optuna journal-file and PostgreSQL storages, the local
and Ray pools, SQLite MLflow; a driver killed by SIGKILL mid-search and resumed; pruning, conditional
spaces, divergence, Pareto fronts and width fidelity. Networks are tiny (widths <= 16, <= 200 steps)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from orchestrator import config as cfgmod
from orchestrator.cli import main
from orchestrator.search import DRIVER_ATTR, KEY_ATTR, PS_ATTR, REASON_ATTR, RETRY_ATTR

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
WIDTH = 8

TINY: dict[str, Any] = {
    "name": "tiny",
    "task": {"kind": "teacher", "dim": 4, "teacher_units": 3, "n_test": 128},
    "model": {"unit": "relu"},
    "dynamics": {"algorithm": "sgd", "lr": 0.2, "steps": STEPS, "batch_size": 32, "eval_every": 10},
    "execution": {"backend": "local", "device": "cpu"},
    "search": {
        "trials": 6, "parallel": 3, "width": WIDTH,
        "space": {"dynamics.lr": {"type": "float", "low": 0.01, "high": 5.0, "log": True}},
        "sampler": {"name": "random", "seed": 0},
        "pruner": {"name": "none"},
    },
}
BD_SPACE = {
    "dynamics.lr": {"type": "float", "low": 0.01, "high": 5.0, "log": True},
    "dynamics.birth_death.rate": {"type": "categorical", "choices": [0.0, 5.0]},
    "dynamics.birth_death.scheme": {"type": "categorical", "choices": ["clone", "prior"],
                                    "when": {"dynamics.birth_death.rate": {"gt": 0}}},
}




def write_cfg(tmp_path: Path, dynamics: dict[str, Any] | None = None, **search: Any) -> Path:
    raw = copy.deepcopy(TINY)
    raw["search"].update(search)
    raw["dynamics"].update(dynamics or {})
    p = tmp_path / f"{raw['name']}.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def search(cfg: Path, out: Path, *extra: str) -> int:
    return main(["search", str(cfg), "--out", str(out), "--no-progress", *extra])


def journal_study(out: Path, name: str = "tiny") -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(out / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


def budget_count(trials: list[FrozenTrial]) -> int:
    retried = {t.user_attrs[RETRY_ATTR] for t in trials if RETRY_ATTR in t.user_attrs}
    return sum(1 for t in trials if t.state.is_finished()
               and not (t.state == TrialState.FAIL and t.number in retried))


def children(out: Path) -> tuple[MlflowClient, dict[str, Any], dict[int, Any]]:
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = summary["mlflow"]["parent_run_id"]
    runs = client.search_runs([summary["mlflow"]["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    by_number: dict[int, Any] = {}
    for r in runs:
        if r.data.tags["mfsweep.key"].count("-") == 1:  # trial-00012 (fidelity/re-evaluation runs: a suffix)
            assert int(r.data.tags["mfsweep.trial_number"]) not in by_number, "two MLflow runs for one trial"
            by_number[int(r.data.tags["mfsweep.trial_number"])] = r
    return client, summary, by_number


def check_mlflow_matches_study(out: Path, trials: list[FrozenTrial]) -> dict[int, Any]:
    _, _, runs = children(out)
    assert sorted(runs) == [t.number for t in trials]
    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
    for t in trials:
        run = runs[t.number]
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == status[t.state]
        if PS_ATTR in t.user_attrs:
            assert run.data.metrics[PS_ATTR] == t.user_attrs[PS_ATTR]
    return runs


# --------------------------------------------------------------------------- journal file, MLflow, conditions


def test_journal_search_mlflow_and_conditional_space(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, space=BD_SPACE, trials=6, sampler={"name": "random", "seed": 3},
                    pruner={"name": "successive_halving", "min_resource": 10, "reduction_factor": 3})
    assert search(cfg, out) == 0
    trials = journal_study(out).get_trials()
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)

    # Conditional space: the scheme exists exactly when birth-death is on, and both branches occurred.
    on = [t for t in trials if t.params["dynamics.birth_death.rate"] > 0]
    off = [t for t in trials if t.params["dynamics.birth_death.rate"] == 0]
    assert on and off
    assert all("dynamics.birth_death.scheme" in t.params for t in on)
    assert all("dynamics.birth_death.scheme" not in t.params for t in off)

    for t in trials:
        assert t.user_attrs[KEY_ATTR] and t.user_attrs["width"] == WIDTH
        assert t.user_attrs[PS_ATTR] == WIDTH * t.user_attrs["steps_trained"]
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["steps_trained"] == STEPS and t.values[0] > 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["study"] == "tiny" and summary["n_trials"] == 6
    states = ("COMPLETE", "PRUNED", "FAIL")
    assert summary["states"] == {s: sum(t.state.name == s for t in trials) for s in states}
    best = min((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[0])
    assert summary["best"]["value"] == pytest.approx(best.values[0])
    assert summary["best"]["params"] == best.params

    # The exported best config is a valid scaling config carrying the best parameters.
    scaling = cfgmod.load(out / "best_config.yaml")
    assert scaling.dynamics.lr == pytest.approx(best.params["dynamics.lr"])
    assert scaling.dynamics.birth_death.rate == best.params["dynamics.birth_death.rate"]
    assert scaling.dynamics.steps == STEPS

    runs = check_mlflow_matches_study(out, trials)
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    for t in trials:
        run = runs[t.number]
        assert float(run.data.params["dynamics.lr"]) == pytest.approx(t.params["dynamics.lr"])
        assert run.data.params["bd_scheme"] == t.params.get("dynamics.birth_death.scheme", "clone")
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_loss"))
        assert steps[0] == 0 and steps == sorted(set(steps))
        if t.state == TrialState.COMPLETE:
            assert steps[-1] == STEPS
            assert run.data.metrics["final_test_loss"] == pytest.approx(t.values[0])
    parent = summary["mlflow"]["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["mfsweep.sweep_key"] == json.loads(
        (out / "state.json").read_text())["search_key"]
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"summary.json", "best_config.yaml", "optimization_history.png", "param_importances.png",
            "parallel_coordinate.png", "search.yaml"} <= arts


def test_diverged_trial_fails_with_reason(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, dynamics={"diverge_threshold": 1e3}, trials=2, parallel=2,
                    space={"dynamics.lr": {"type": "categorical", "choices": [0.1, 1.0e6]}})
    # Pin the two trials: an Optuna user would enqueue them the same way.
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(
        str(_mkdir(out) / "optuna.journal"))))
    study.enqueue_trial({"dynamics.lr": 0.1})
    study.enqueue_trial({"dynamics.lr": 1.0e6})
    assert search(cfg, out) == 0
    ok, boom = journal_study(out).get_trials()
    assert ok.state == TrialState.COMPLETE
    assert boom.state == TrialState.FAIL and "diverged" in boom.user_attrs[REASON_ATTR]
    runs = check_mlflow_matches_study(out, [ok, boom])
    assert "diverged" in runs[1].data.tags["mfsweep.reason"]


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# --------------------------------------------------------------------------- pruning


def test_pruning_reduces_particle_steps(tmp_path: Path) -> None:
    """Same trials (random sampler, same seed) with and without successive halving: pruned networks leave
    their packs early, so the search trains measurably fewer particle-steps."""
    totals: dict[str, int] = {}
    params: dict[str, list[dict[str, Any]]] = {}
    for pruner in ("none", "successive_halving"):
        out = tmp_path / pruner
        cfg = write_cfg(tmp_path, trials=9, parallel=3, dynamics={"steps": 60},
                        pruner={"name": pruner, "min_resource": 10, "reduction_factor": 3})
        assert search(cfg, out) == 0
        trials = journal_study(out).get_trials()
        params[pruner] = [t.params for t in trials]
        totals[pruner] = sum(t.user_attrs[PS_ATTR] for t in trials)
        if pruner == "none":
            assert all(t.state == TrialState.COMPLETE for t in trials)
            assert totals[pruner] == 9 * WIDTH * 60
        else:
            pruned = [t for t in trials if t.state == TrialState.PRUNED]
            assert pruned, "successive halving pruned nothing"
            assert all(t.user_attrs[PS_ATTR] < WIDTH * 60 for t in pruned)
            check_mlflow_matches_study(out, trials)
    assert params["none"] == params["successive_halving"]
    assert totals["successive_halving"] < 0.8 * totals["none"], totals


# --------------------------------------------------------------------------- kill -9 and resume


def test_killed_driver_resumes_without_losing_or_duplicating_trials(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, trials=12, parallel=3, dynamics={"steps": 200, "eval_every": 20},
                    sampler={"name": "tpe", "seed": 0, "n_startup_trials": 4})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "search", str(cfg), "--out", str(out),
                             "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    before: list[FrozenTrial] = []
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"driver ended before it was killed: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            if (out / "optuna.journal").exists():
                try:
                    trials = journal_study(out).get_trials()
                except KeyError:  # the study is not created yet
                    trials = []
                finished = [t for t in trials if t.state.is_finished()]
                running = [t for t in trials if t.state == TrialState.RUNNING]
                if len(finished) >= 3 and running:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    before = journal_study(out).get_trials()
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the search never had finished and running trials at once")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    running_at_kill = [t for t in before if t.state == TrialState.RUNNING]
    finished_at_kill = {t.number: t for t in before if t.state.is_finished()}
    assert running_at_kill and finished_at_kill

    assert main(["resume", str(out), "--no-progress"]) == 0
    trials = journal_study(out).get_trials()
    by_number = {t.number: t for t in trials}
    # Nothing lost: what had finished is unchanged.
    for n, t in finished_at_kill.items():
        now = by_number[n]
        assert now.state == t.state and now.params == t.params and now.values == t.values
    # Trials the dead driver left running: failed with a reason, retried exactly once with the same params
    # (a trial killed between ask and its last suggest has the rest of its params sampled by the retry).
    for t in running_at_kill:
        dead = by_number[t.number]
        assert dead.state == TrialState.FAIL
        assert "killed or crashed" in dead.user_attrs[REASON_ATTR]
        retries = [r for r in trials if r.user_attrs.get(RETRY_ATTR) == t.number]
        assert len(retries) == 1 and retries[0].state.is_finished()
        assert dead.params.items() <= retries[0].params.items()
        if len(dead.params) == 1:
            assert retries[0].params == dead.params
        assert retries[0].user_attrs[DRIVER_ATTR] != dead.user_attrs[DRIVER_ATTR]
    # Nothing duplicated: exactly `trials` count toward the budget, plus one failed original per retry.
    assert budget_count(trials) == 12
    assert len(trials) == 12 + len(running_at_kill)
    assert all(t.state.is_finished() for t in trials)
    check_mlflow_matches_study(out, trials)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_trials"] == len(trials)
    assert summary["retried"] == sorted(t.number for t in running_at_kill)

    # The same command again finds the search finished: no new trial.
    assert search(cfg, out) == 0
    assert len(journal_study(out).get_trials()) == len(trials)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.mark.postgres
def test_postgres_storage_resume_and_stale_trial(tmp_path: Path, postgres_db: Callable[[str], str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import orchestrator.search as search_mod

    # Optuna's heartbeat with a grace period a test can wait out.
    monkeypatch.setattr(search_mod, "HEARTBEAT_S", 1)
    monkeypatch.setattr(search_mod, "GRACE_S", 2)
    url = postgres_db("optuna")
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, trials=4, parallel=2, space=BD_SPACE)
    assert search(cfg, out, "--storage", url, "--study", "pg") == 0
    study = optuna.load_study(study_name="pg", storage=url)
    first = study.get_trials()
    assert len(first) == 4 and all(t.state.is_finished() for t in first)

    # A trial left RUNNING by a driver of this search that died (same search key, another driver id).
    key = json.loads((out / "state.json").read_text())["search_key"]
    dead = study.ask()
    dead.suggest_float("dynamics.lr", 0.01, 5.0, log=True)
    dead.set_user_attr(KEY_ATTR, key)
    dead.set_user_attr(DRIVER_ATTR, "dead-driver")
    # A trial of another driver sharing the study (another search key) whose heartbeat stopped.
    hb = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    foreign = optuna.load_study(study_name="pg", storage=hb).ask()
    foreign.suggest_float("dynamics.lr", 0.01, 5.0, log=True)
    foreign.set_user_attr(KEY_ATTR, "another-search")
    hb.record_heartbeat(hb.get_trial_id_from_study_id_trial_number(hb.get_study_id_from_name("pg"), foreign.number))
    # Not a race: this heartbeat is never renewed, so 3 s later it is past the 2 s grace by construction.
    # Staleness is a matter of time, and Optuna's only public way to observe it (fail_stale_trials) would do
    # the driver's job under test.
    time.sleep(3)

    # Same command with a larger budget: continues the study (storage and study come from the folder).
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert search(cfg, out, "--trials", "7") == 0
    # The driver records heartbeats itself: Optuna's warning about ask() outside optimize() never fires.
    assert not [w for w in seen if "Heartbeat" in str(w.message)]
    trials = optuna.load_study(study_name="pg", storage=url).get_trials()
    gone = trials[foreign.number]
    assert gone.state == TrialState.FAIL  # failed by Optuna's fail_stale_trials
    again = [t for t in trials if t.user_attrs.get(RETRY_ATTR) == foreign.number]
    assert len(again) == 1 and again[0].user_attrs["mfsweep.retry_reason"] == "heartbeat stale"
    assert gone.params.items() <= again[0].params.items()
    def same(ts: list[FrozenTrial]) -> list[tuple[Any, ...]]:
        return [(t.number, t.params, t.values) for t in ts]

    assert same(trials[:4]) == same(first)
    stale = trials[dead.number]
    assert stale.state == TrialState.FAIL and "killed or crashed" in stale.user_attrs[REASON_ATTR]
    retries = [t for t in trials if t.user_attrs.get(RETRY_ATTR) == dead.number]
    # Parameters the dead trial had suggested are kept; the ones it never reached are sampled.
    assert len(retries) == 1 and stale.params.items() <= retries[0].params.items()
    # 4 + 3 new (two of them the retries): the two failed originals do not count.
    assert budget_count(trials) == 7 and len(trials) == 9
    check_mlflow_matches_study(out, [t for t in trials if t.user_attrs.get(KEY_ATTR) == key])
    assert json.loads((out / "summary.json").read_text())["storage"].startswith("postgresql://")


# --------------------------------------------------------------------------- multi-objective, fidelity, Ray


def test_pareto_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna.visualization import matplotlib as ovm

    drawn: list[Any] = []  # the Axes behind pareto_front.png, kept to read what was drawn

    def keep(*args: Any, **kwargs: Any) -> Any:
        ax = plot_pareto_front(*args, **kwargs)
        drawn.append(ax)
        return ax

    plot_pareto_front = ovm.plot_pareto_front
    monkeypatch.setattr(ovm, "plot_pareto_front", keep)
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, trials=6, parallel=3, objective={"mode": "pareto"},
                    sampler={"name": "nsga2", "seed": 0, "population_size": 4},
                    space={"width": {"type": "int", "low": 2, "high": 32, "log": True},
                           "dynamics.lr": {"type": "float", "low": 0.05, "high": 2.0, "log": True}})
    assert search(cfg, out) == 0
    trials = journal_study(out).get_trials()
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    for t in done:
        assert t.values[1] == t.params["width"] * STEPS == t.user_attrs[PS_ATTR]
    front = json.loads((out / "summary.json").read_text())["pareto_front"]
    assert front
    for f in front:
        dominated = any(o.values[0] <= f["values"][0] and o.values[1] <= f["values"][1]
                        and o.values != f["values"] for o in done)
        assert not dominated
    # The plot holds every complete trial at (loss, particle-steps), on axes named after the two objectives.
    assert (out / "pareto_front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(drawn) == 1
    ax = drawn[0]
    points = sorted(tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets())
    assert points == sorted((t.values[0], t.values[1]) for t in done)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("final test loss", "particle-steps")


def test_width_fidelity_spearman(tmp_path: Path) -> None:
    """Planted ranking: four learning rates a factor 4 apart, 40 steps; a larger step trains further at every
    width, so the order of the width-4 losses carries over to width 16 and the reported rank correlation is 1.
    It equals scipy's Spearman rho over the width-4 losses (the study) and the width-16 losses (the PROMOTED
    MLflow runs), both read independently of the fidelity report."""
    from scipy.stats import spearmanr

    out = tmp_path / "out"
    lrs = [0.01, 0.04, 0.16, 0.64]
    cfg = write_cfg(tmp_path, trials=4, parallel=4, fidelity={"widths": [4, 16], "top_k": 4})
    study = optuna.create_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(
        str(_mkdir(out) / "optuna.journal"))))
    for lr in lrs:
        study.enqueue_trial({"dynamics.lr": lr})
    assert search(cfg, out) == 0
    client, summary, _ = children(out)
    fid = summary["fidelity"]
    small = {t.number: t.values[0] for t in journal_study(out).get_trials() if t.state == TrialState.COMPLETE}
    assert sorted(small) == [0, 1, 2, 3]
    promoted = client.search_runs([summary["mlflow"]["experiment_id"]],
                                  filter_string="tags.`optuna.state` = 'PROMOTED'")
    assert len(promoted) == 4 and all(r.data.params["width"] == "16" for r in promoted)
    large = {int(r.data.tags["mfsweep.trial_number"]): r.data.metrics["final_test_loss"] for r in promoted}
    assert sorted(large) == [0, 1, 2, 3]
    by_row = {r["number"]: r["losses"] for r in fid["trials"]}
    for n in range(4):
        assert by_row[n]["4"] == pytest.approx(small[n]) and by_row[n]["16"] == pytest.approx(large[n])
    # The planted order: loss falls with the learning rate at both widths.
    for losses in (small, large):
        assert [losses[n] for n in range(4)] == sorted((losses[n] for n in range(4)), reverse=True), losses
    want = float(spearmanr([small[n] for n in range(4)], [large[n] for n in range(4)]).statistic)
    rho = fid["spearman"]["16"]
    assert rho == pytest.approx(want) and rho == pytest.approx(1.0)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.metrics["fidelity.spearman.w4_w16"] == pytest.approx(rho)
    best = fid["best_at_largest_width"]
    assert best["number"] == min(large, key=large.__getitem__) and best["value"] == pytest.approx(min(large.values()))
    assert summary["best"]["number"] == best["number"] and summary["best"]["value"] == best["value"]
    assert "at width 16" in (out / "best_config.yaml").read_text().splitlines()[0]


@pytest.mark.slow
def test_search_on_ray_pool(tmp_path: Path) -> None:
    """The default execution: packs on Ray actors, retire requests crossing to the actor. A pruned network
    leaves its pack on the actor before the end: it trains fewer particle-steps than a full run, so the search
    as a whole trains fewer than the same six trials without a pruner (6 full runs)."""
    out = tmp_path / "out"
    # The actor runs ahead of the driver (its reports stream): a pack that ends in a few ms finishes before a
    # retire request reaches it. So the networks train long enough, and the last rung of successive halving
    # (10 * 3^4 = 810 steps) leaves 1190 steps for the request to cross.
    steps = 2000
    full = WIDTH * steps  # particle-steps of one network that trains to the end
    cfg = write_cfg(tmp_path, trials=6, parallel=6, space=BD_SPACE, dynamics={"steps": steps, "eval_every": 10},
                    pruner={"name": "successive_halving", "min_resource": 10, "reduction_factor": 3})
    assert search(cfg, out, "--backend", "ray") == 0
    trials = journal_study(out).get_trials()
    assert len(trials) == 6 and budget_count(trials) == 6
    for t in trials:
        assert t.user_attrs[PS_ATTR] == WIDTH * t.user_attrs["steps_trained"]
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs[PS_ATTR] == full
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "successive halving pruned nothing on the Ray pool"
    assert all(0 < t.user_attrs[PS_ATTR] < full for t in pruned), [t.user_attrs[PS_ATTR] for t in pruned]
    assert any(t.state == TrialState.COMPLETE for t in trials)
    assert sum(t.user_attrs[PS_ATTR] for t in trials) < 6 * full
    summary = json.loads((out / "summary.json").read_text())
    assert summary["particle_steps"] == sum(t.user_attrs[PS_ATTR] for t in trials)
    check_mlflow_matches_study(out, trials)


def test_reeval_picks_lowest_mean_on_fresh_seeds(tmp_path: Path) -> None:
    """The top_k trials are retrained on fresh seeds; each recorded loss equals an independent re-training
    (one network alone, that seed's initial particles and batches); the pick is the lowest mean and is what
    summary.json and best_config.yaml carry."""
    from workers.engine import NetworkSpec, Pack, Scheme, derive_seed

    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, trials=5, parallel=5, space=BD_SPACE, reeval={"top_k": 3, "seeds": 2})
    assert search(cfg, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    rv = summary["reeval"]
    complete = sorted((t for t in journal_study(out).get_trials() if t.state == TrialState.COMPLETE),
                      key=lambda t: (t.values[0], t.number))
    assert [r["number"] for r in rv["trials"]] == [t.number for t in complete[:3]]
    scfg = cfgmod.load(out / "best_config.yaml")
    for row in rv["trials"]:
        assert row["seeds"] == [1, 2]  # fresh: the search itself trained on seed 0
        t = next(tt for tt in complete if tt.number == row["number"])
        assert row["single_run"] == pytest.approx(t.values[0])
        for seed, loss in zip(row["seeds"], row["losses"], strict=True):
            p = t.params
            alone = Pack(scfg.task.spec(), scfg.model.spec(), scfg.dynamics.spec(),
                         [NetworkSpec(0, WIDTH, seed=derive_seed(seed, 0), lr=p["dynamics.lr"],
                                      bd_rate=p["dynamics.birth_death.rate"],
                                      bd_scheme=Scheme(p.get("dynamics.birth_death.scheme", "clone")))],
                         data_seed=seed)
            want = next(r.result_loss for rep in alone.train() for r in rep.retired)  # the objective
            assert loss == pytest.approx(want, rel=1e-5)
        assert row["mean"] == pytest.approx(sum(row["losses"]) / 2)
    pick = min(rv["trials"], key=lambda r: r["mean"])
    assert rv["pick"]["number"] == pick["number"] == summary["best"]["number"]
    assert summary["best"]["value"] == pytest.approx(pick["mean"]) and "fresh seeds" in summary["best"]["value_is"]
    assert scfg.dynamics.lr == pytest.approx(pick["params"]["dynamics.lr"])
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    reevaluated = client.search_runs([summary["mlflow"]["experiment_id"]],
                                     filter_string="tags.`optuna.state` = 'REEVALUATED'")
    assert len(reevaluated) == 6 and all(r.info.status == "FINISHED" for r in reevaluated)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.metrics["reeval.pick_mean"] == pytest.approx(pick["mean"])


def test_reeval_rejected_for_pareto_and_large_top_k(tmp_path: Path) -> None:
    from orchestrator.search_config import load_search

    cfg = write_cfg(tmp_path, trials=4, reeval={"top_k": 5, "seeds": 2})
    with pytest.raises(cfgmod.ConfigError, match=r"reeval\.top_k"):
        load_search(cfg)
    cfg = write_cfg(tmp_path, trials=4, objective={"mode": "pareto"}, reeval={"top_k": 2, "seeds": 2})
    with pytest.raises(cfgmod.ConfigError, match=r"reeval needs objective\.mode: single"):
        load_search(cfg)


def test_summary_particle_steps_count_extra_stages(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, trials=3, parallel=3, reeval={"top_k": 2, "seeds": 2})
    assert search(cfg, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    trials = sum(t.user_attrs[PS_ATTR] for t in journal_study(out).get_trials())
    assert summary["particle_steps"] == trials + 2 * 2 * WIDTH * STEPS  # no pruner: every network ran STEPS
