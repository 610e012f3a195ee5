"""The engine specs every shipped config gives, against a snapshot taken before the config -> spec conversion
became generic (orchestrator/schema.py): the same task, model, dynamics and network specs, MLflow params and
pack keys. Regenerate (only for an intended change): ``python -m tests.orchestrator.test_spec_snapshot``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator import config as cfgmod
from orchestrator.config import ScalingConfig
from orchestrator.plan import network_settings, network_spec, pack_key
from orchestrator.search_config import load_search
from workers.engine import to_dict

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT = Path(__file__).with_name("data") / "spec_snapshot.json"
CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
DATA = "<DATA>"  # the exported wine file's path, which differs per run
# Beside the shipped configs: every key of the task, model and dynamics sections away from its default.
KITCHEN = {
    "mixture": [
        "task.kind=gaussian_mixture", "task.dim=2", "task.seed=5", "task.measure=gaussian", "task.measure_std=1.5",
        "task.n_train=100", "task.n_test=200",
        "task.components=[{weight: 1.5, mean: [0.1, 0.2], var: 0.3}, {weight: -0.5, mean: [1, 2], var: 2}]",
        "model.unit=gaussian", "model.gaussian_var=0.7", "model.parametrization=ntk",
        "model.init={z: uniform, loc: 0.1, scale: 0.5, low: -1, high: 3, c_law: uniform, c_mean: 0.2, "
        "c_std: 0.3, c_low: -2, c_high: 2, bias_std: 0.1}",
        "model.prior={z: normal, scale: 2.0, c_mean: 0.5, loc: -0.2}",
        "dynamics.algorithm=gd", "dynamics.lr=0.3", "dynamics.steps=5000", "dynamics.batch_size=64",
        "dynamics.finite_set=true", "dynamics.temperature=0.01", "dynamics.eval_every=20",
        "dynamics.diverge_threshold=1e6",
        "dynamics.birth_death={rate: 0.5, scheme: prior, every: 3, quench: 100, convention: per_step}",
        "dynamics.stop={rule: plateau, window: 400, rel_tol: 0.05, confidence: 1.5, min_steps: 10}",
        "dynamics.lr_schedule={kind: inverse_time, decay_steps: 300, floor: 0.1}", "execution.dtype=float64"],
    "teacher": ["task.out_dim=2", "task.teacher_units=5", "task.inputs=uniform_box", "model.bias=false",
                "model.unit=tanh", "dynamics.lr_schedule.kind=cosine"],
    "dataset": ["task.kind=dataset", "task.path=DATA", "task.targets=[target]", "task.classification=true",
                "task.test_fraction=0.3", "task.standardize_inputs=false", "task.seed=2",
                "dynamics.algorithm=gd"],
}


def _variants(rel: str, data: Path) -> list[tuple[str, ScalingConfig]]:
    path = ROOT / rel
    if rel.startswith("configs/search/"):
        return [("trial", load_search(path).resolve({})[0])]
    sets = {"configs/user/wine_dataset.yaml": [f"task.path={data}"],
            "configs/user/ridge_function.yaml": [f"task.module_dir={ROOT}"]}.get(rel, [])
    return cfgmod.load(path, sets).variant_configs()


def _entry(vcfg: ScalingConfig, data: Path) -> dict[str, Any]:
    out = {"task": to_dict(vcfg.task.spec()), "model": to_dict(vcfg.model.spec()),
           "dynamics": to_dict(vcfg.dynamics.spec()), "network": to_dict(network_spec(vcfg, 3, 16, 11)),
           "settings": network_settings(vcfg), "pack_key": pack_key(vcfg)}
    return json.loads(json.dumps(out).replace(json.dumps(str(data))[1:-1], DATA))


def snapshot(tmp: Path) -> dict[str, Any]:
    from examples.export_sklearn import export

    data = export("wine", tmp / "wine.csv")
    out: dict[str, Any] = {"quickstart": {n: _entry(v, data) for n, v in cfgmod.load(None).variant_configs()}}
    for rel in CONFIGS:
        out[rel] = {n: _entry(v, data) for n, v in _variants(rel, data)}
    for name, sets in KITCHEN.items():
        cfg = cfgmod.load(None, [x.replace("DATA", str(data)) for x in [*sets, "sweep.variants=[]"]])
        out[f"kitchen/{name}"] = {"base": _entry(cfg, data)}
    return out


@pytest.fixture(scope="module")
def current(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return snapshot(tmp_path_factory.mktemp("snap"))


EXPECTED: dict[str, Any] = json.loads(SNAPSHOT.read_text())


def test_the_snapshot_covers_every_shipped_config() -> None:
    assert sorted(EXPECTED) == sorted(["quickstart", *CONFIGS, *(f"kitchen/{k}" for k in KITCHEN)])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_shipped_config_gives_the_same_specs_as_before(current: dict[str, Any], name: str) -> None:
    assert current[name] == EXPECTED[name]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        SNAPSHOT.write_text(json.dumps(snapshot(Path(d)), indent=1, sort_keys=True) + "\n")
