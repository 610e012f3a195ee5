"""``import workers.engine`` stays torch-only: it must not import ray, optuna or mlflow (README.md, Layout)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, types

def heavy():
    return sorted(m for m in sys.modules if m.split(".")[0] in {"ray", "optuna", "mlflow"})

import workers.engine
from workers.engine import DynamicsSpec, ModelSpec, NetworkSpec, Pack, TaskSpec
Pack(TaskSpec(dim=3), ModelSpec(), DynamicsSpec(steps=2), [NetworkSpec(0, 4, seed=0)]).step_once()
after_engine = heavy()
# Control: a stand-in module shows that the probe does see such imports.
sys.modules["optuna.samplers"] = types.ModuleType("optuna.samplers")
print(json.dumps([after_engine, heavy()]))
"""


def test_engine_import_does_not_pull_ray_optuna_mlflow() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         check=True)
    after_engine, control = json.loads(out.stdout.strip().splitlines()[-1])
    assert after_engine == []
    assert control == ["optuna.samplers"]


DRIVER_PROBE = """
import json, sys
import orchestrator.cli, orchestrator.scaling
from orchestrator.config import load
from orchestrator.plan import plan_networks, plan_packs
from orchestrator.preflight import _may_have_gpu, local_worker_memory
cfg = load(None)
mem, _ = local_worker_memory(cfg.execution)
jobs = plan_packs(cfg, plan_networks(cfg), n_workers=2, memory_bytes=mem, checkpoint_dir=None)
heavy = sorted(m for m in ("torch", "scipy", "mlflow", "matplotlib") if m in sys.modules)
print(json.dumps([len(jobs), heavy, _may_have_gpu()]))
"""


def test_driver_starts_without_torch_scipy_matplotlib_or_mlflow() -> None:
    # The driver's start-up is on the path to the first training step: torch loads in the workers, MLflow in
    # the tracker's thread beside the pool's start, scipy and matplotlib when the results are fitted and
    # plotted (bench/startup.py).
    out = subprocess.run([sys.executable, "-c", DRIVER_PROBE], capture_output=True, text=True, timeout=120,
                         check=True)
    n_jobs, loaded, gpu_driver = json.loads(out.stdout.strip().splitlines()[-1])
    assert n_jobs > 0
    # Where a GPU driver is present, torch counts the GPUs and their memory (the planner needs them).
    assert loaded == ([] if not gpu_driver else ["torch"])
