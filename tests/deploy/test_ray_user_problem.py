"""The user's problem on a real multi-node Ray cluster (a head and two worker nodes on this machine): a target
function whose module lives in a folder on no worker's path reaches the workers through Ray's runtime
environment (py_modules), and a dataset reaches them through the object store."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from .support import MFSWEEP, ROOT

MODULE = '''"""A user's target function, written by the test into a folder no worker can import from."""
import os

import torch

with open({mark!r}, "a") as fh:  # where each importing process found this module
    fh.write(f"{{os.getpid()}} {{__file__}}\\n")


def wave(x):
    return torch.sin(2.0 * x[:, 0]) + x[:, 1] * x[:, 2]
'''


def _config(tmp: Path, name: str, task: dict, dynamics: dict) -> Path:
    raw = {"name": name, "task": task, "model": {"unit": "relu"},
           "dynamics": {"lr": 0.05, "steps": 40, "eval_every": 10, "batch_size": 32, **dynamics},
           "sweep": {"widths": [4, 8, 16, 32], "seeds": 1, "variants": [
               {"name": "base"}, {"name": "bd", "set": {"dynamics.birth_death.rate": 0.5}}]},
           "execution": {"backend": "ray", "workers": 2, "max_networks_per_pack": 2, "checkpoint_every": 10}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _points(out: Path) -> list[dict]:
    summary = json.loads((out / "summary.json").read_text())
    return [p for v in summary["variants"] for p in v["points"]]


@pytest.mark.slow
def test_function_and_dataset_tasks_on_a_multinode_cluster(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    code = tmp_path / "code"
    package = f"usertarget_{secrets.token_hex(4)}"  # a name no process could import by accident
    (code / package).mkdir(parents=True)
    mark = tmp_path / "imported_from.txt"
    (code / package / "__init__.py").write_text(MODULE.format(mark=str(mark)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": np.tanh(x @ [1.0, -1.0, 0.5])}).to_parquet(
        tmp_path / "data.parquet")
    run_dir = tmp_path / "run"  # the driver's working directory: neither the code nor the data folder
    run_dir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)

    # The head takes no actors: both training actors land on the worker nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        sweeps = {
            "fn": _config(tmp_path, "fn", {"kind": "function", "target": f"{package}:wave", "dim": 3,
                                           "module_dir": str(code), "inputs": "gaussian"}, {"algorithm": "sgd"}),
            "ds": _config(tmp_path, "ds", {"kind": "dataset", "path": str(tmp_path / "data.parquet"),
                                           "targets": ["y"]}, {"algorithm": "sgd", "finite_set": True}),
        }
        for name, cfg in sweeps.items():
            out = tmp_path / f"out_{name}"
            proc = subprocess.run([str(MFSWEEP), "scaling", str(cfg), "--address", cluster.address, "--out",
                                   str(out), "--no-progress"], capture_output=True, text=True, timeout=480,
                                  cwd=run_dir, env=env)
            assert proc.returncode == 0, proc.stderr[-4000:]
            assert "2 cpu worker(s)" in proc.stderr, proc.stderr[-2000:]
            points = _points(out)
            assert len(points) == 8 and all(p["status"] == "finished" for p in points), points
    finally:
        cluster.shutdown()

    # The driver imported the module from its folder; the workers from the copy Ray shipped them.
    lines = [ln.split(" ", 1) for ln in mark.read_text().splitlines()]
    driver = [f for _, f in lines if f.startswith(str(code))]
    workers = [f for _, f in lines if not f.startswith(str(code))]
    assert driver, lines
    assert workers and all("runtime_resources" in f for f in workers), lines
