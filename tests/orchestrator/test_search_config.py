"""Search configs: every bad search space is one clear line and exit code 2 before anything starts; the
shipped configs load; conditions and budgets resolve as documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import ConfigError
from orchestrator.search_config import WIDTH, Condition, load_search, searchable_keys

ROOT = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "name": "bad",
    "task": {"kind": "teacher", "dim": 4, "teacher_units": 3, "n_test": 64},
    "dynamics": {"steps": 20, "eval_every": 10, "batch_size": 16},
    "execution": {"backend": "local"},
    "search": {"trials": 4, "parallel": 2,
               "space": {"dynamics.lr": {"type": "float", "low": 0.1, "high": 1.0}}},
}


def write(tmp_path: Path, search: dict[str, Any]) -> Path:
    raw = {**BASE, "search": {**BASE["search"], **search}}
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


LR = {"type": "float", "low": 0.1, "high": 1.0}


@pytest.mark.parametrize(
    ("search", "needle"),
    [
        ({"space": {"model.unit": {"type": "categorical", "choices": []}}}, "non-empty 'choices'"),
        ({"space": {"dynamics.lr": {"type": "float", "low": 2.0, "high": 1.0}}},
         "low (2) must be <= high (1)"),
        ({"space": {"dynamics.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}},
         "log scale needs low > 0"),
        ({"space": {"width": {"type": "int", "low": -8, "high": 64, "log": True}}},
         "log scale needs low > 0"),
        ({"sampler": {"name": "hillclimb"}}, "search.sampler.name"),
        ({"pruner": {"name": "patient"}}, "search.pruner.name"),
        ({"space": {"model.unt": {"type": "categorical", "choices": ["relu"]}}},
         "unknown parameter key; did you mean 'model.unit'?"),
        ({"space": {"task.dim": {"type": "int", "low": 2, "high": 8}}}, "unknown parameter key"),
        ({"space": {"dynamics.steps": {"type": "int", "low": 10, "high": 20}}}, "cannot be searched"),
        ({"space": {"model.unit": {"type": "categorical", "choices": ["relu", "softplus"]}}},
         "search.space.model.unit='softplus'"),
        ({"space": {"dynamics.lr": {"type": "float", "low": -1.0, "high": 1.0}}}, "dynamics.lr"),
        ({"space": {"dynamics.birth_death.scheme": {"type": "categorical", "choices": ["clone"],
                                                    "when": {"dynamics.birth_death.rate": {"gt": 0}}}}},
         "not a parameter defined before it"),
        ({"space": {"dynamics.birth_death.rate": {"type": "float", "low": 0, "high": 5},
                    "dynamics.birth_death.scheme": {"type": "categorical", "choices": ["clone"],
                                                    "when": {"dynamics.birth_death.rate": {"bigger": 0}}}}},
         "unknown operator 'bigger'"),
        ({"space": {}}, "search.space is empty"),
        ({"space": {"dynamics.lr": {"type": "float", "choices": [0.1]}}}, "not 'choices'"),
        ({"space": {"dynamics.lr": LR}, "objective": {"mode": "pareto"},
          "pruner": {"name": "successive_halving"}}, "cannot prune multi-objective"),
        ({"space": {"dynamics.lr": LR}, "objective": {"mode": "pareto"}, "sampler": {"name": "cmaes"}},
         "cmaes is single-objective"),
        ({"space": {"dynamics.lr": LR}, "objective": {"budget": "particle_steps"}}, "needs 'particle_steps'"),
        ({"space": {WIDTH: {"type": "int", "low": 8, "high": 64}}, "fidelity": {"widths": [8, 32]}},
         "width cannot be searched with search.fidelity"),
        ({"space": {"dynamics.lr": LR}, "fidelity": {"widths": [32, 8]}}, "increasing"),
        ({"space": {"dynamics.lr": LR}, "trials": 0}, "search.trials"),
        ({"space": {"dynamics.lr": LR}, "sampel": {}},
         "unknown key 'search.sampel'; did you mean 'search.sample"),
    ],
)
def test_bad_search_space_exit_2_one_line_before_start(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       search: dict[str, Any], needle: str) -> None:
    out = tmp_path / "out"
    rc = main(["search", str(write(tmp_path, search)), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert not out.exists()  # nothing started: no storage, no study, no MLflow run


def test_trials_flag_and_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "--out", str(tmp_path / "o")]) == 2
    assert "needs a CONFIG" in capsys.readouterr().err
    assert main(["search", str(write(tmp_path, {})), "--trials", "0", "--out", str(tmp_path / "o")]) == 2
    assert "search.trials" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["bd_teacher", "arch_spin3", "pareto_teacher"])
def test_shipped_configs_load_and_resolve(name: str) -> None:
    cfg = load_search(ROOT / "configs" / "search" / f"{name}.yaml")
    assert cfg.search.space
    for key in cfg.search.space:
        assert key in searchable_keys()
    tcfg, width = cfg.resolve({})
    assert tcfg.dynamics.steps == cfg.steps_for(width)


def test_particle_step_budget_sets_steps_per_width() -> None:
    cfg = load_search(ROOT / "configs" / "search" / "arch_spin3.yaml")
    budget = cfg.search.objective.particle_steps
    assert budget is not None
    for width in (16, 64, 256):
        tcfg, w = cfg.resolve({WIDTH: width, "model.unit": "tanh", "dynamics.lr": 0.3})
        assert w == width and tcfg.dynamics.steps == budget // width
        assert tcfg.model.unit.value == "tanh" and tcfg.dynamics.lr == 0.3


def test_resolve_rejects_invalid_combinations(tmp_path: Path) -> None:
    cfg = load_search(write(tmp_path, {"space": {"model.unit": {"type": "categorical",
                                                                "choices": ["relu", "gaussian"]}}}))
    with pytest.raises(ConfigError, match=r"dynamics\.lr"):
        cfg.resolve({"dynamics.lr": -1.0})


def test_conditions() -> None:
    params = {"a": 0.0, "b": "clone"}
    assert not Condition("a", "gt", 0).holds(params)
    assert Condition("a", "ge", 0).holds(params)
    assert Condition("b", "in", ["clone", "prior"]).holds(params)
    assert Condition("b", "not_in", ["prior"]).holds(params)
    assert not Condition("c", "eq", 1).holds(params)  # depends on an inactive parameter
    assert not Condition("b", "lt", 3).holds(params)  # a number comparison on a string never holds
