"""Convergence-aware sweeps end to end: every result says whether it converged, the plateau rule stops networks
early, and a finished sweep extended with ``mfsweep resume DIR --set dynamics.steps=N`` continues from its
checkpoints exactly as a sweep run to N steps from the start, without retraining converged networks."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.scaling import read_results

# Two variants on a small teacher: 'slow' barely moves (its loss is flat: it converges), 'fast' still falls at
# step 150 for some widths. The plateau rule tests every 5 steps over a 100-step window.
BASE = ["name=conv", "task.kind=teacher", "task.dim=8", "task.n_test=256", "sweep.widths=[4,16,64]",
        "sweep.seeds=2", "dynamics.eval_every=5", "dynamics.batch_size=64", "dynamics.lr=0.05",
        "dynamics.stop.rule=plateau", "dynamics.stop.window=100", "dynamics.stop.rel_tol=0.05",
        "dynamics.stop.confidence=1.0", "execution.backend=local", "execution.checkpoint_every=50",
        "sweep.variants=[{name: fast}, {name: slow, set: {dynamics.lr: 0.0001}}]"]


def sweep(out: Path, steps: int) -> int:
    args = ["scaling", "--out", str(out), "--no-progress"]
    for s in [*BASE, f"dynamics.steps={steps}"]:
        args += ["--set", s]
    return main(args)


def comparable(out: Path) -> dict[int, tuple[object, ...]]:
    return {i: (r.status, r.step, r.final_test_loss, r.final_loss_mean, r.final_loss_se, r.converged,
                r.final_slope) for i, r in read_results(out / "results.jsonl").items()}


def test_results_carry_convergence_and_extension_equals_the_longer_sweep(tmp_path: Path) -> None:
    out, straight = tmp_path / "ext", tmp_path / "straight"
    assert sweep(out, 150) == 0
    first = read_results(out / "results.jsonl")
    assert len(first) == 12 and all(r.status == "finished" for r in first.values())
    assert all(r.converged is not None and r.final_loss_mean is not None and r.final_loss_se is not None
               for r in first.values())
    slow = [r for r in first.values() if r.variant == "slow"]
    assert all(r.converged and r.step < 150 for r in slow), "a flat loss stops before the cap"
    go_on = {i for i, r in first.items() if not r.converged}
    assert go_on, "some 'fast' network must still be falling at step 150"
    summary = json.loads((out / "summary.json").read_text())
    for v in summary["variants"]:
        assert {"n_converged", "n_points", "regime", "power", "power_all", "floor"} <= v.keys()
        assert v["n_converged"] == sum(1 for p in v["points"] if p["converged"])
        for p in v["points"]:
            assert {"test_loss", "test_loss_se", "converged", "stop_step", "final_slope"} <= p.keys()

    # Extend: only the unconverged networks train on; the converged keep their single record.
    assert main(["resume", str(out), "--no-progress", "--set", "dynamics.steps=300"]) == 0
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    per_net: dict[int, int] = {}
    for rec in lines:
        per_net[rec["net_id"]] = per_net.get(rec["net_id"], 0) + 1
    assert {i for i, k in per_net.items() if k == 2} == go_on and set(per_net.values()) <= {1, 2}
    extended = read_results(out / "results.jsonl")
    assert all(extended[i].cap == 300 and extended[i].step > 150 for i in go_on)
    assert all(extended[i] == first[i] for i in first if i not in go_on)

    # ... exactly as the sweep run to 300 steps from the start (CPU, checkpoints bit for bit).
    assert sweep(straight, 300) == 0
    assert comparable(out) == comparable(straight)

    # MLflow holds each curve once, up to the extended cap.
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    s2 = json.loads((out / "summary.json").read_text())
    runs = client.search_runs([s2["mlflow"]["experiment_id"]],
                              filter_string="tags.mlflow.parentRunId != ''", max_results=100)
    keyed = {r.data.tags["mfsweep.key"]: r for r in runs if "mfsweep.key" in r.data.tags}
    assert len(keyed) == 12
    for rec in extended.values():
        run = keyed[rec.key]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")]
        assert len(steps) == len(set(steps)) and max(steps) == rec.step
        assert run.data.tags["mfsweep.converged"] == str(rec.converged).lower()
        assert run.data.metrics["final_loss_mean"] == rec.final_loss_mean


def test_resume_set_accepts_only_a_larger_cap(tmp_path: Path, capsys: object) -> None:
    out = tmp_path / "r"
    assert sweep(out, 60) == 0
    assert main(["resume", str(out), "--set", "dynamics.lr=0.1"]) == 2
    assert main(["resume", str(out), "--set", "dynamics.steps=30"]) == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "only dynamics.steps" in err and ">= 60" in err
