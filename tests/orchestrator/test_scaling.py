"""End-to-end scaling sweeps on real components: local Ray, SQLite MLflow, a multi-node Ray cluster with a node
killed mid-sweep, and a driver killed mid-sweep then resumed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from mlflow.tracking import MlflowClient

from orchestrator import analysis
from orchestrator import config as cfgmod
from orchestrator.cli import main
from orchestrator.scaling import NetworkResult, ScalingSweep, read_results

ROOT = Path(__file__).resolve().parents[2]
# Small sweeps on the teacher task; the CLI's default config is the quick-start one, so override it whole.
SMALL = ["name=sweep", "task.kind=teacher", "task.dim=16", "sweep.variants=[]", "sweep.widths=[8,16,32]",
         "sweep.seeds=2", "dynamics.steps=60", "dynamics.eval_every=20", "dynamics.batch_size=64", "task.n_test=256",
         "dynamics.lr=0.05"]


def child_runs(out: Path) -> tuple[MlflowClient, list]:
    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(uri)
    summary = json.loads((out / "summary.json").read_text())
    parent = summary["mlflow"]["parent_run_id"]
    runs = client.search_runs([summary["mlflow"]["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    return client, runs


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Figure]]:
    """The Figures a sweep saves as scaling.png and curves.png, kept so a test can read what was drawn."""
    kept: dict[str, list[Figure]] = {"scaling": [], "curves": []}
    for kind in kept:
        real = getattr(analysis, f"{kind}_figure")

        def keep(*args: object, _real: object = real, _kind: str = kind, **kwargs: object) -> Figure:
            fig = _real(*args, **kwargs)  # type: ignore[operator]
            kept[_kind].append(fig)
            return fig

        monkeypatch.setattr(analysis, f"{kind}_figure", keep)
    return kept


def loglog_polyfit(points: list[dict]) -> tuple[float, float]:
    """(slope, exp(intercept)) of numpy's least-squares line through (log width, log test loss)."""
    slope, intercept = np.polyfit(np.log([p["width"] for p in points]), np.log([p["test_loss"] for p in points]), 1)
    return float(slope), math.exp(intercept)


def check_scaling_figure(fig: Figure, variant: dict, line: str) -> None:
    """scaling.png shows every point of the variant in summary.json (converged ones solid, the others hollow)
    and the fit ``line`` ("power" or "power_all") from its summary parameters over the fitted widths."""
    name = variant["name"]
    ax = fig.axes[0]
    drawn = {a.get_gid(): a for a in [*ax.lines, *ax.collections] if a.get_gid()}
    for role, conv in (("converged", True), ("unconverged", False)):
        xy = sorted(tuple(map(float, p)) for p in drawn[f"{name}:{role}"].get_offsets())  # type: ignore[attr-defined]
        assert xy == sorted((float(p["width"]), p["test_loss"]) for p in variant["points"]
                            if bool(p["converged"]) is conv), role
    fit = variant[line]
    curve = drawn[f"{name}:{line}"]
    assert isinstance(curve, Line2D)
    x = np.asarray(curve.get_xdata(), dtype=np.float64)
    assert (x[0], x[-1]) == (min(fit["widths"]), max(fit["widths"]))
    assert np.allclose(np.asarray(curve.get_ydata()), fit["prefactor"] * x ** fit["exponent"])


def test_main_job_ray_mlflow_fit(tmp_path: Path, figures: dict[str, list[Figure]]) -> None:
    out = tmp_path / "run"
    args = ["scaling", "--out", str(out), "--no-progress"]
    for s in [*SMALL, "sweep.variants=[{name: sgd}, {name: bd, set: {dynamics.birth_death.rate: 5.0}}]"]:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"] == "sweep"
    assert [v["name"] for v in summary["variants"]] == ["sgd", "bd"]
    for v in summary["variants"]:
        assert len(v["points"]) == 6 and all(p["status"] == "finished" for p in v["points"])
        # 60 steps are far from stationary: nothing converged, so there is no exponent of the law, only the
        # all-points fit, labelled as such, and the regime says so.
        assert v["n_points"] == 6 and v["n_converged"] == 0 and v["regime"] == "time-limited"
        assert v["exponent"] is None and v["power"] is None and v["power_all"]["includes_unconverged"]
        assert all(p["converged"] is False and p["stop_step"] == 60 for p in v["points"])
        assert v["verdict"].startswith("time-limited")
        # The all-points slope is the least-squares line through the summary's own points.
        slope, prefactor = loglog_polyfit(v["points"])
        assert v["power_all"]["exponent"] == pytest.approx(slope, rel=1e-9)
        assert v["power_all"]["prefactor"] == pytest.approx(prefactor, rel=1e-9)
    assert len(figures["scaling"]) == 1 and len(figures["curves"]) == 1
    for v in summary["variants"]:
        check_scaling_figure(figures["scaling"][0], v, "power_all")
    curve_lines = {ln.get_gid(): ln for ax in figures["curves"][0].axes for ln in ax.lines if ln.get_gid()}
    assert set(curve_lines) == {f"{v} n={n}" for v in ("sgd", "bd") for n in (8, 16, 32)}

    client, runs = child_runs(out)
    assert len(runs) == 12
    seed_curves: dict[str, list[dict[int, float]]] = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        hist = client.get_metric_history(run.info.run_id, "test_loss")
        assert sorted(m.step for m in hist) == [0, 20, 40, 60]
        label = f"{run.data.params['variant']} n={run.data.params['width']}"
        seed_curves.setdefault(label, []).append({m.step: m.value for m in hist})
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
        assert run.data.params["width"] in {"8", "16", "32"}
        assert "final_test_loss" in run.data.metrics
    # curves.png: per (variant, width) the mean over the seeds of the curves MLflow holds.
    for label, per_seed in seed_curves.items():
        assert len(per_seed) == 2
        line = curve_lines[label]
        assert np.asarray(line.get_xdata()).tolist() == [0, 20, 40, 60]
        assert np.allclose(line.get_ydata(), [np.mean([c[s] for c in per_seed]) for s in (0, 20, 40, 60)])
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    sgd = summary["variants"][0]
    assert parent.data.metrics["sgd.all_points.exponent"] == pytest.approx(sgd["power_all"]["exponent"])
    assert parent.data.metrics["sgd.n_converged"] == 0 and "sgd.exponent" not in parent.data.metrics
    assert parent.data.tags["mfsweep.regime.sgd"] == "time-limited"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "scaling.png", "config.yaml"} <= arts
    assert mlflow.get_tracking_uri()  # mlflow importable in tests (only tracking.py imports it in the package)


def test_planted_results_recover_the_exponent(tmp_path: Path, figures: dict[str, list[Figure]]) -> None:
    """The sweep's analysis end to end on planted results: every network's result is recorded beforehand in
    results.jsonl as L = 2 n^-1 times 5% lognormal noise, converged, with the same relative standard error,
    so the sweep has nothing left to train and goes straight to its summary. The exponent recovers -1 with an
    interval that excludes -0.5, equals numpy's least-squares slope over the summary's own points (equal
    relative errors: the weighted fit is the plain one), and is what the parent MLflow run and scaling.png show."""
    out = tmp_path / "planted"
    out.mkdir()
    cfg = cfgmod.load(None, ["name=planted", "task.kind=teacher", "task.dim=4", "sweep.variants=[]",
                             "sweep.widths=[8,16,32,64,128,256]", "sweep.seeds=3", "dynamics.steps=100",
                             "execution.backend=local"])
    sweep = ScalingSweep(cfg, out, progress=False)
    rng = np.random.default_rng(7)
    with (out / "results.jsonl").open("w") as fh:
        for net in sweep.networks:
            loss = 2.0 / net.spec.width * math.exp(0.05 * rng.standard_normal())
            fh.write(json.dumps(dataclasses.asdict(NetworkResult(
                net.net_id, net.key, net.variant, net.spec.width, net.replicate, "finished", loss, 60, "converged",
                0.1, final_loss_mean=loss, final_loss_se=0.02 * loss, converged=True, final_slope=0.0,
                cap=100))) + "\n")
    sweep = ScalingSweep(cfg, out, progress=False)
    summary = sweep.run()
    # The summary's points are a lazy sequence (summary.json is written a point at a time).
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary, default=list))
    (v,) = summary["variants"]
    assert len(v["points"]) == 18 and v["n_converged"] == 18 and v["regime"] == "width-limited"
    lo, hi = v["exponent_ci95"]
    assert lo < -1.0 < hi and not lo <= -0.5 <= hi
    assert v["exponent"] == pytest.approx(-1.0, abs=0.05)
    slope, prefactor = loglog_polyfit(v["points"])
    assert v["exponent"] == pytest.approx(slope, rel=1e-9) and v["prefactor"] == pytest.approx(prefactor, rel=1e-9)
    assert v["power"]["weighted"] and v["floor"] is None
    assert v["verdict"].startswith("width-limited")
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    metrics = client.get_run(summary["mlflow"]["parent_run_id"]).data.metrics
    assert metrics[f"{v['name']}.exponent"] == pytest.approx(slope)
    assert (metrics[f"{v['name']}.exponent_ci95_lo"], metrics[f"{v['name']}.exponent_ci95_hi"]) == (lo, hi)
    (fig,) = figures["scaling"]
    check_scaling_figure(fig, v, "power")
    assert not figures["curves"]  # nothing trained in this session: no curves to draw


def test_diverging_network_recorded_and_sweep_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "div"
    cfg = cfgmod.load(None, [*SMALL, "execution.backend=local",
                             "sweep.variants=[{name: ok}, {name: boom, set: {dynamics.lr: 1.0e+6}}]"])
    summary = ScalingSweep(cfg, out, progress=False).run()
    ok, boom = summary["variants"]
    assert all(p["status"] == "finished" for p in ok["points"])
    assert all(p["status"] == "diverged" for p in boom["points"])
    assert ok["power_all"] is not None and boom["power_all"] is None and boom["n_points"] == 0
    res = read_results(out / "results.jsonl")
    assert all("lower dynamics.lr" in r.reason for r in res.values() if r.status == "diverged")


def wait_for(event: Callable[[], bool], what: str, proc: subprocess.Popen[str] | None = None,
             timeout: float = 240.0) -> None:
    """Poll until ``event()`` holds: an observable event (a file written), never a fixed sleep; fails loudly
    when it does not happen in time or when ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not event():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"ended before {what}: {proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout}s")
        time.sleep(0.05)


def _run_cli(out: Path, extra: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "scaling", "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_resume_after_killed_driver(tmp_path: Path) -> None:
    out = tmp_path / "killed"
    sets = ["sweep.variants=[]", "sweep.widths=[8,16,32,64]", "sweep.seeds=2", "dynamics.steps=800",
            "dynamics.eval_every=50", "dynamics.batch_size=64", "task.n_test=256", "execution.checkpoint_every=100",
            "execution.max_networks_per_pack=2", "execution.backend=local"]
    extra = [x for s in sets for x in ("--set", s)]
    proc = _run_cli(out, extra)
    # Kill the driver once some networks finished and others are mid-way (checkpoints exist).
    wait_for(lambda: len(read_results(out / "results.jsonl")) >= 2 and any((out / "checkpoints").glob("*.pt")),
             "two results and a checkpoint", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_results(out / "results.jsonl")
    assert 2 <= len(before) < 8

    assert main(["resume", str(out), "--no-progress"]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    ids = [json.loads(x)["net_id"] for x in lines]
    assert sorted(ids) == list(range(8))  # every network once: finished ones were not retrained
    after = read_results(out / "results.jsonl")
    for nid, rec in before.items():
        assert after[nid] == rec
    client, runs = child_runs(out)
    assert len(runs) == 8
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")]
        assert sorted(steps) == list(range(0, 801, 50)), run.info.run_name  # nothing lost, nothing twice


def test_resume_records_what_a_killed_driver_had_not(tmp_path: Path) -> None:
    """A driver killed after its packs checkpointed but before it recorded their reports (MLflow points still
    queued, network ends not yet in results.jsonl): resume re-sends the packs' report logs, so every point
    arrives once and every network gets its result, although no pack trains again (each restarts at its end,
    with nothing to replay)."""
    out = tmp_path / "lost"
    cfg = cfgmod.load(None, [*SMALL, "execution.backend=local"])
    ScalingSweep(cfg, out, progress=False).run()
    full = read_results(out / "results.jsonl")
    assert len(full) == 6
    # What the killed driver had made durable: two results, no MLflow points (an empty store).
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert main(["resume", str(out), "--no-progress", "--tracking-uri", fresh]) == 0
    ids = [json.loads(x)["net_id"] for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(full)  # each network once
    assert read_results(out / "results.jsonl") == full  # the very records the first driver wrote
    client = MlflowClient(fresh)
    summary = json.loads((out / "summary.json").read_text())
    runs = client.search_runs([summary["mlflow"]["experiment_id"]],
                              filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow']['parent_run_id']}'")
    assert len(runs) == 6
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")]
        assert sorted(steps) == [0, 20, 40, 60], run.info.run_name
        assert run.info.status == "FINISHED" and "final_test_loss" in run.data.metrics


def test_extension_trains_on_networks_whose_end_was_not_recorded(tmp_path: Path) -> None:
    """The same loss, then `resume --set dynamics.steps=120`: a network's end re-sent from the log at the old
    cap is recorded at that cap, so the network still trains to the new one."""
    out = tmp_path / "ext"
    ScalingSweep(cfgmod.load(None, [*SMALL, "execution.backend=local"]), out, progress=False).run()
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:2]) + "\n")
    assert main(["resume", str(out), "--no-progress", "--set", "dynamics.steps=120"]) == 0
    res = read_results(out / "results.jsonl")
    assert sorted(res) == list(range(6)) and {r.step for r in res.values()} == {120}
    client, runs = child_runs(out)
    assert len(runs) == 6
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")]
        assert sorted(steps) == list(range(0, 121, 20)), run.info.run_name


def test_ctrl_c_keeps_results_and_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "int"
    sets = ["sweep.variants=[]", "sweep.widths=[8,16]", "sweep.seeds=2", "dynamics.steps=100000",
            "dynamics.eval_every=50", "dynamics.batch_size=32", "task.n_test=128", "execution.backend=local",
            "execution.checkpoint_every=50"]
    proc = _run_cli(out, [x for s in sets for x in ("--set", s)])
    wait_for(lambda: any((out / "checkpoints").glob("*.pt")), "checkpoint", proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text
    assert f"mfsweep resume {out}" in text
    assert (out / "plan.json").exists() and list((out / "checkpoints").glob("*.pt"))


def test_same_out_different_config_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x"
    args = ["scaling", "--out", str(out), "--no-progress", "--backend", "local"]
    assert main([*args, *[x for s in SMALL for x in ("--set", s)]]) == 0
    assert main([*args, *[x for s in SMALL for x in ("--set", s)], "--set", "dynamics.lr=0.3"]) == 2
    assert "holds a different sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_multinode_worker_killed_mid_sweep(tmp_path: Path) -> None:
    """A head and two worker nodes (real raylets); one worker node dies mid-sweep; its packs restart from
    their checkpoints on the surviving node and every network's result arrives exactly once."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address)
        cfg = cfgmod.load(None, [
            "sweep.widths=[8,16,32,64]", "sweep.seeds=2", "dynamics.steps=1200", "dynamics.eval_every=50",
            "dynamics.batch_size=64", "task.n_test=256", "execution.checkpoint_every=100", "execution.workers=2",
            "execution.max_networks_per_pack=2"])
        out = tmp_path / "cluster"
        sweep = ScalingSweep(cfg, out, address=cluster.address, progress=False)
        killed = threading.Event()

        def killer() -> None:
            # Wait until packs are mid-way on both nodes (checkpoints written), then kill one node.
            deadline = time.monotonic() + 180
            while len(list((out / "checkpoints").glob("*.pt"))) < 2:
                if time.monotonic() > deadline:
                    return  # never killed: the test fails on `killed`
                time.sleep(0.05)
            cluster.remove_node(workers[0], allow_graceful=False)
            killed.set()

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        summary = sweep.run()
        t.join(timeout=5)
        assert killed.is_set()
        pts = summary["variants"][0]["points"]
        assert len(pts) == 8 and all(p["status"] == "finished" for p in pts), pts
        ids = [json.loads(x)["net_id"] for x in (out / "results.jsonl").read_text().splitlines()]
        assert sorted(ids) == list(range(8))
        client, runs = child_runs(out)
        assert len(runs) == 8
        for run in runs:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_loss")]
            assert sorted(steps) == list(range(0, 1201, 50))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_group_runs_hold_every_seed_and_end_again_when_extended(tmp_path: Path) -> None:
    """tracking.runs: group: one child run per (variant, width), each seed's curve under 'seed<r>/', values
    equal to the per-network run of the same sweep; extending the finished sweep continues the curves and
    ends each group run again."""
    sets = [*SMALL, "execution.backend=local"]
    per_net, grouped = tmp_path / "net", tmp_path / "group"
    ScalingSweep(cfgmod.load(None, sets), per_net, progress=False).run()
    ScalingSweep(cfgmod.load(None, [*sets, "tracking.runs=group"]), grouped, progress=False).run()
    c_net, nets = child_runs(per_net)
    c_grp, groups = child_runs(grouped)
    assert len(nets) == 6 and len(groups) == 3
    want = {(r.data.params["width"], f"seed{r.data.params['replicate']}"):
            [(m.step, m.value) for m in c_net.get_metric_history(r.info.run_id, "test_loss")] for r in nets}
    for g in groups:
        assert g.info.status == "FINISHED" and g.info.run_name == f"base width={g.data.params['width']}"
        assert "replicate" not in g.data.params
        for seed in ("seed0", "seed1"):
            got = [(m.step, m.value) for m in c_grp.get_metric_history(g.info.run_id, f"{seed}/test_loss")]
            assert sorted(got) == sorted(want[(g.data.params["width"], seed)])
    assert main(["resume", str(grouped), "--no-progress", "--set", "dynamics.steps=100"]) == 0
    c_grp, groups = child_runs(grouped)
    assert len(groups) == 3
    for g in groups:
        assert g.info.status == "FINISHED"
        for seed in ("seed0", "seed1"):
            steps = [m.step for m in c_grp.get_metric_history(g.info.run_id, f"{seed}/test_loss")]
            assert sorted(steps) == list(range(0, 101, 20))  # continued to the new cap, no step twice
