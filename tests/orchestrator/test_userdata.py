"""The user's own problem through the real CLI: dataset and function tasks in ``mfsweep scaling`` (every
dynamics) and ``mfsweep search`` (width fidelity), on the local pool and on Ray; every bad input is one line,
exit 2, before anything starts; a resume on changed data is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import config as cfgmod
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
MFSWEEP = Path(sys.executable).with_name("mfsweep")

TARGETS_MODULE = """
import torch

def good(x):
    return torch.relu(x[:, 0]) - x[:, 1] ** 2

def pair(x):
    return torch.stack([x[:, 0], x[:, 1] * x[:, 2]], dim=1)

def wrong_shape(x):
    return x[:, :, None]

def wrong_rows(x):
    return x[:3, 0]

def raises(x):
    raise RuntimeError("boom")

def nonfinite(x):
    return x[:, 0] / 0.0

not_callable = 3
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Good and bad data files and a target module in a folder that is not on sys.path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + np.maximum(x[:, 0], 0)
    p = {name: tmp_path / name for name in ("ok.npz", "ok.csv", "ok.parquet", "ok.npy", "mismatch.npz", "nan.csv",
                                             "inf.npz", "garbage.npz", "garbage.parquet", "data.txt", "labels.csv",
                                             "narrow.npy")}
    np.savez(p["ok.npz"], x=x, y=y)
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": y})
    frame.to_csv(p["ok.csv"], index=False)
    frame.to_parquet(p["ok.parquet"])
    np.save(p["ok.npy"], np.hstack([x, y[:, None]]))
    np.save(p["narrow.npy"], np.hstack([x[:, :2], y[:, None]]))
    np.savez(p["mismatch.npz"], x=x, y=y[:70])
    bad = frame.copy()
    bad.loc[5, "b"] = np.nan
    bad.to_csv(p["nan.csv"], index=False)
    x_inf = x.copy()
    x_inf[9, 2] = np.inf
    np.savez(p["inf.npz"], x=x_inf, y=y)
    p["garbage.npz"].write_text("this is not a zip archive\n")
    p["garbage.parquet"].write_bytes(b"PAR1 but not really")
    p["data.txt"].write_text("1 2 3\n")
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "label": np.where(x[:, 2] > 0, 1, 0)}).to_csv(p["labels.csv"],
                                                                                         index=False)
    mods = tmp_path / "usercode"
    mods.mkdir()
    (mods / "mytargets.py").write_text(TARGETS_MODULE)
    p["mods"] = mods
    return p


def ds(path: Path, *extra: str) -> list[str]:
    return ["task.kind=dataset", f"task.path={path}", "dynamics.finite_set=true", *extra]


def fn(mods: Path, target: str, *extra: str) -> list[str]:
    return ["task.kind=function", f"task.target={target}", f"task.module_dir={mods}", "task.dim=3", *extra]


BAD = {
    "missing file": (lambda f: ds(f["ok.npz"].with_name("absent.npz")), "not found"),
    "unknown format": (lambda f: ds(f["data.txt"]), "unknown format"),
    "unreadable npz": (lambda f: ds(f["garbage.npz"]), "cannot read garbage.npz"),
    "unreadable parquet": (lambda f: ds(f["garbage.parquet"], "task.targets=[y]"), "cannot read garbage.parquet"),
    "wrong npz key": (lambda f: ds(f["ok.npz"], "task.y_key=labels"), "no array 'labels'"),
    "wrong column": (lambda f: ds(f["ok.csv"], "task.targets=[price]"), "no column price"),
    "wrong feature column": (lambda f: ds(f["ok.parquet"], "task.targets=[y]", "task.features=[a,zz]"), "no column zz"),
    "no target column named": (lambda f: ds(f["ok.csv"]), "name the target column"),
    "bad npy index": (lambda f: ds(f["ok.npy"], "task.targets=[7]"), "column indices"),
    "NaN": (lambda f: ds(f["nan.csv"], "task.targets=[y]"), "NaN/inf value(s) in the inputs (first in row 5)"),
    "inf": (lambda f: ds(f["inf.npz"]), "NaN/inf value(s) in the inputs (first in row 9)"),
    "length mismatch": (lambda f: ds(f["mismatch.npz"]), "80 input rows but 70 target rows"),
    "no training data": (lambda f: ds(f["ok.npz"], "task.test_fraction=0.995"), "leaves no training data"),
    "given test split, wrong layout": (lambda f: ds(f["ok.npy"], f"task.test_path={f['narrow.npy']}"),
                                       "same layout"),
    "missing test file": (lambda f: ds(f["ok.npy"], f"task.test_path={f['ok.npy'].with_name('t.npy')}"),
                          "test_path: data file"),
    "sgd without finite set": (lambda f: ["task.kind=dataset", f"task.path={f['ok.npz']}"], "finite_set=true"),
    "dataset without path": (lambda f: ["task.kind=dataset", "dynamics.finite_set=true"], "needs task.path"),
    "path on a built-in task": (lambda f: ["task.kind=teacher", f"task.path={f['ok.npz']}"], "only by task.kind"),
    "target module missing": (lambda f: fn(f["mods"], "nosuchmodule:f"), "No module named 'nosuchmodule'"),
    "target function missing": (lambda f: fn(f["mods"], "mytargets:absent"), "has no attribute 'absent'"),
    "target not callable": (lambda f: fn(f["mods"], "mytargets:not_callable"), "is not callable"),
    "target without colon": (lambda f: fn(f["mods"], "mytargets.good"), "package.module:function"),
    "target wrong shape": (lambda f: fn(f["mods"], "mytargets:wrong_shape"), "returned shape (8, 3, 1)"),
    "target wrong rows": (lambda f: fn(f["mods"], "mytargets:wrong_rows"), "returned shape (3,)"),
    "target raises": (lambda f: fn(f["mods"], "mytargets:raises"), "RuntimeError: boom"),
    "target not finite": (lambda f: fn(f["mods"], "mytargets:nonfinite"), "non-finite"),
    "module_dir missing": (lambda f: fn(f["mods"] / "nope", "mytargets:good"), "is not a directory"),
}


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2(case: str, files: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = BAD[case]
    sys_path = list(sys.path)
    try:
        code = main(["validate", str(ROOT / "configs" / "scaling" / "teacher_relu.yaml"), *_sets(make(files))])
    finally:
        sys.path[:] = sys_path
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert code == 2, cap
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert expected in err, err
    assert "Traceback" not in cap.out + cap.err


def test_bad_input_through_the_installed_command(files: dict[str, Path], tmp_path: Path) -> None:
    """`mfsweep scaling` as a user runs it: exit 2, one line, no traceback, nothing started or written."""
    for sets, expected in ((ds(files["nan.csv"], "task.targets=[y]"), "NaN/inf"),
                           (fn(files["mods"], "mytargets:wrong_shape"), "returned shape")):
        out = tmp_path / "out"
        proc = subprocess.run([str(MFSWEEP), "scaling", str(ROOT / "configs" / "scaling" / "teacher_relu.yaml"),
                               *_sets(sets), "--out", str(out), "--no-progress"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert not out.exists()  # before anything started (no Ray, no MLflow, no output folder)


def _scaling_cfg(tmp_path: Path, task: dict[str, Any], dynamics: dict[str, Any], variants: list[dict[str, Any]],
                 name: str) -> Path:
    raw = {"name": name, "task": task, "model": {"unit": "relu"},
           "dynamics": {"lr": 0.05, "steps": 30, "eval_every": 10, "batch_size": 32, **dynamics},
           "sweep": {"widths": [4, 16], "seeds": 2, "variants": variants},
           "execution": {"backend": "local", "device": "cpu", "checkpoint_every": 10}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


EVERY_DYNAMICS = [
    {"name": "gd", "set": {"dynamics.algorithm": "gd"}},
    {"name": "finite_sgd", "set": {"dynamics.algorithm": "sgd", "dynamics.finite_set": True}},
    {"name": "langevin", "set": {"dynamics.temperature": 0.001}},
    {"name": "birth_death", "set": {"dynamics.birth_death.rate": 0.5, "dynamics.birth_death.scheme": "prior"}},
]


def _summary_points(out: Path) -> dict[str, list[dict[str, Any]]]:
    summary = json.loads((out / "summary.json").read_text())
    return {v["name"]: v["points"] for v in summary["variants"]}


@pytest.mark.parametrize("fmt", ["npz", "csv", "parquet"])
def test_dataset_scaling_every_dynamics_local(fmt: str, files: dict[str, Path], tmp_path: Path) -> None:
    task = {"kind": "dataset", "path": str(files[f"ok.{fmt}"]), "standardize_targets": True}
    if fmt != "npz":
        task["targets"] = ["y"]
    cfg = _scaling_cfg(tmp_path, task, {"algorithm": "sgd", "finite_set": True}, EVERY_DYNAMICS, "ds")
    out = tmp_path / "out"
    assert main(["scaling", str(cfg), "--out", str(out), "--no-progress"]) == 0
    points = _summary_points(out)
    assert set(points) == {v["name"] for v in EVERY_DYNAMICS}
    for pts in points.values():
        assert len(pts) == 4 and all(p["status"] == "finished" and np.isfinite(p["test_loss"]) for p in pts), pts
    # The content hash names the data in the sweep's MLflow params, the plan and the resolved config.
    loaded = cfgmod.load(out / "config.yaml")
    content = loaded.task.content_hash
    assert content and content.startswith("sha256:")
    plan = json.loads((out / "plan.json").read_text())
    assert all(job["task"]["content_hash"] == content for job in plan)
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.data.params["task.content_hash"] == content
    children = client.search_runs([summary["mlflow"]["experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert children and all(r.data.params["content_hash"] == content for r in children)


def test_same_data_same_hash_different_data_different_hash(files: dict[str, Path]) -> None:
    hashes = {fmt: cfgmod.load(None, ds(files[f"ok.{fmt}"], *([] if fmt == "npz" else ["task.targets=[y]"])))
              .task.content_hash for fmt in ("npz", "csv", "parquet")}
    assert len(set(hashes.values())) == 1
    other = cfgmod.load(None, ds(files["labels.csv"], "task.targets=[label]")).task.content_hash
    assert other != hashes["npz"]


def test_function_scaling_every_dynamics_local(files: dict[str, Path], tmp_path: Path) -> None:
    task = {"kind": "function", "target": "mytargets:pair", "module_dir": str(files["mods"]), "dim": 3,
            "inputs": "uniform_box", "n_train": 64, "n_test": 64}
    variants = [{"name": "online_sgd"}, *EVERY_DYNAMICS]
    cfg = _scaling_cfg(tmp_path, task, {"algorithm": "sgd"}, variants, "fn")
    out = tmp_path / "out"
    sys_path = list(sys.path)
    try:
        assert main(["scaling", str(cfg), "--out", str(out), "--no-progress"]) == 0
    finally:
        sys.path[:] = sys_path
    points = _summary_points(out)
    assert set(points) == {v["name"] for v in variants}
    for pts in points.values():
        assert len(pts) == 4 and all(p["status"] == "finished" and np.isfinite(p["test_loss"]) for p in pts), pts
    assert cfgmod.load(out / "config.yaml").task.out_dim == 2  # found by calling the target


def test_resume_on_changed_data_is_refused(files: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "mine.csv"
    data.write_bytes(files["ok.csv"].read_bytes())
    cfg = _scaling_cfg(tmp_path, {"kind": "dataset", "path": str(data), "targets": ["y"]},
                       {"algorithm": "gd"}, [], "rs")
    out = tmp_path / "out"
    assert main(["scaling", str(cfg), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    frame = pd.read_csv(data)
    frame.loc[0, "a"] += 1.0
    frame.to_csv(data, index=False)
    for argv in (["resume", str(out), "--no-progress"], ["scaling", str(cfg), "--out", str(out), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "changed since" in err, err


def _search_cfg(tmp_path: Path, task: dict[str, Any], dynamics: dict[str, Any], backend: str = "local") -> Path:
    raw = {"name": "us", "task": task, "model": {"unit": "relu"},
           "dynamics": {"lr": 0.05, "steps": 30, "eval_every": 10, "batch_size": 32, **dynamics},
           "execution": {"backend": backend, "device": "cpu"},
           "search": {"trials": 4, "parallel": 4,
                      "space": {"dynamics.lr": {"type": "float", "low": 0.01, "high": 1.0, "log": True}},
                      "fidelity": {"widths": [4, 16], "top_k": 2},
                      "sampler": {"name": "random", "seed": 0}, "pruner": {"name": "none"}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("kind", ["dataset", "function"])
def test_search_with_width_fidelity_local(kind: str, files: dict[str, Path], tmp_path: Path) -> None:
    if kind == "dataset":
        task: dict[str, Any] = {"kind": "dataset", "path": str(files["labels.csv"]), "targets": ["label"],
                                "classification": True}
        dyn: dict[str, Any] = {"algorithm": "sgd", "finite_set": True}
    else:
        task = {"kind": "function", "target": "mytargets:good", "module_dir": str(files["mods"]), "dim": 3}
        dyn = {"algorithm": "sgd"}
    out = tmp_path / "out"
    sys_path = list(sys.path)
    try:
        assert main(["search", str(_search_cfg(tmp_path, task, dyn)), "--out", str(out), "--no-progress"]) == 0
    finally:
        sys.path[:] = sys_path
    summary = json.loads((out / "summary.json").read_text())
    fid = summary["fidelity"]
    assert len(fid["trials"]) == 2 and all(r["losses"]["16"] is not None for r in fid["trials"])
    best = yaml.safe_load((out / "best_config.yaml").read_text())
    assert best["task"]["kind"] == kind and best["task"]["content_hash"]


@pytest.mark.slow
def test_dataset_scaling_and_search_on_ray(files: dict[str, Path], tmp_path: Path) -> None:
    """On Ray the arrays travel through the object store (the driver puts them once)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    task = {"kind": "dataset", "path": str(files["ok.parquet"]), "targets": ["y"]}
    cfg = _scaling_cfg(tmp_path, task, {"algorithm": "sgd", "finite_set": True}, EVERY_DYNAMICS[:2], "ray")
    raw = yaml.safe_load(cfg.read_text())
    raw["execution"].update({"backend": "ray", "workers": 2})
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    proc = subprocess.run([str(MFSWEEP), "scaling", str(cfg), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for pts in _summary_points(out).values():
        assert all(p["status"] == "finished" for p in pts), pts


def test_shipped_user_configs_validate(tmp_path: Path) -> None:
    """configs/user/: the wine example after its first step (export), the function example from the repo."""
    from examples.export_sklearn import export

    csv = export("wine", tmp_path / "wine.csv")
    wine = cfgmod.load(ROOT / "configs" / "user" / "wine_dataset.yaml", [f"task.path={csv}"])
    assert (wine.task.dim, wine.task.out_dim, wine.task.n_train + wine.task.n_test) == (13, 3, 178)
    ridge = cfgmod.load(ROOT / "configs" / "user" / "ridge_function.yaml", [f"task.module_dir={ROOT}"])
    assert ridge.task.out_dim == 1 and ridge.task.content_hash
    for cfg in (wine, ridge):
        variants = dict(cfg.variant_configs())
        assert any(v.dynamics.birth_death.rate > 0 for v in variants.values())
        assert {v.model.parametrization.value for v in variants.values()} == {"mean_field", "ntk"}
