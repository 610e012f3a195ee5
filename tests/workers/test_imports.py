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
