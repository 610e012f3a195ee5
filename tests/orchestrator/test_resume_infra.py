"""``mfsweep resume`` retries what earlier versions recorded as failed because workers were lost (such a loss
is not a network's result), and keeps failures that were the network's own."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml
from optuna.trial import TrialState

from orchestrator.cli import main
from orchestrator.pool import is_infrastructure_reason
from orchestrator.scaling import read_results
from orchestrator.search import KEY_ATTR, REASON_ATTR, RETRY_ATTR
from tests.orchestrator.test_search import budget_count, journal_study, search, write_cfg

SETS = ["sweep.variants=[]", "sweep.widths=[8,16]", "sweep.seeds=2", "dynamics.steps=60", "dynamics.eval_every=20",
        "dynamics.batch_size=16", "task.n_test=64", "execution.backend=local", "execution.max_networks_per_pack=1"]
OLD_REASONS = ["worker died (RayActorError) 4 times", "no live Ray worker left to run it"]


def test_reasons() -> None:
    assert all(is_infrastructure_reason(r) for r in OLD_REASONS)
    assert not is_infrastructure_reason("RuntimeError: checkpoint dir is a file")
    assert not is_infrastructure_reason("non-finite loss at step 40; lower dynamics.lr")


def test_resume_retries_networks_failed_by_lost_workers(tmp_path: Path) -> None:
    out = tmp_path / "old"
    assert main(["scaling", "--out", str(out), "--no-progress", *[x for s in SETS for x in ("--set", s)]]) == 0
    good = read_results(out / "results.jsonl")
    assert len(good) == 4
    # What an earlier version left after losing its workers: two networks failed for that, one for its own
    # fault (kept as it is).
    lines = []
    for nid, rec in sorted(good.items()):
        row = asdict(rec)
        if nid < 3:
            reason = OLD_REASONS[nid] if nid < 2 else "RuntimeError: boom"
            row.update(status="failed", final_test_loss=None, reason=reason)
        lines.append(json.dumps(row))
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert set(read_results(out / "results.jsonl")) == {2, 3}

    assert main(["resume", str(out), "--no-progress"]) == 0
    after = read_results(out / "results.jsonl")
    assert sorted(after) == [0, 1, 2, 3]
    assert after[0].status == after[1].status == "finished"  # trained again (from their checkpoints)
    assert after[0].final_test_loss == good[0].final_test_loss and after[1].final_test_loss == good[1].final_test_loss
    assert after[2].status == "failed" and after[2].reason == "RuntimeError: boom"  # its own failure stays
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(p["status"] for v in summary["variants"] for p in v["points"]) == ["failed"] + ["finished"] * 3


def test_resume_retries_trials_failed_by_lost_workers(tmp_path: Path) -> None:
    out = tmp_path / "s"
    cfg = write_cfg(tmp_path, trials=3, parallel=3)
    assert search(cfg, out) == 0
    # The search of that earlier version had a budget of 4 trials: 3 completed, 1 failed by lost workers.
    raw = yaml.safe_load((out / "search.yaml").read_text())
    raw["search"]["trials"] = 4
    (out / "search.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    key = json.loads((out / "state.json").read_text())["search_key"]
    study = journal_study(out)
    # A trial an earlier version failed because its pack's workers were lost.
    lost = study.ask()
    lost.suggest_float("dynamics.lr", 0.01, 5.0, log=True)
    lost.set_user_attr(KEY_ATTR, key)
    lost.set_user_attr(REASON_ATTR, "pack failed: no live Ray worker left to run it")
    study.tell(lost, state=TrialState.FAIL)
    assert main(["resume", str(out), "--no-progress"]) == 0
    trials = journal_study(out).get_trials()
    again = [t for t in trials if t.user_attrs.get(RETRY_ATTR) == lost.number]
    assert len(again) == 1 and again[0].state == TrialState.COMPLETE
    assert again[0].params == lost.params
    assert budget_count(trials) == 4  # the lost one does not count; its retry does
