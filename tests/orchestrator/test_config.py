"""Config loading and validation: every bad input is one clear line, exit code 2, before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator import config as cfgmod
from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "needle"),
    [
        ("task: {kind: teacher, dimm: 3}\n", [], "unknown key 'task.dimm'; did you mean 'task.dim'"),
        ("task: [1, 2\n", [], "malformed YAML at line"),
        ("- a\n- b\n", [], "top level must be a mapping"),
        ("sweep: {widths: []}\n", [], "widths is empty"),
        ("sweep: {widths: [16, -4]}\n", [], "widths must be positive integers"),
        ("sweep: {widths: [16, 16]}\n", [], "duplicates"),
        ("dynamics: {lr: -0.1}\n", [], "dynamics.lr: Input should be greater than 0"),
        ("dynamics: {lr: .nan}\n", [], "dynamics.lr"),
        ("dynamics: {steps: fast}\n", [], "dynamics.steps: Input should be a valid integer"),
        ("model: {unit: softplus}\n", [], "model.unit"),
        ("dynamics: {birth_death: {rate: -1}}\n", [], "dynamics.birth_death.rate"),
        ("dynamics: {birth_death: {scheme: teleport}}\n", [], "dynamics.birth_death.scheme"),
        ("task: {kind: gaussian_mixture, dim: 1}\nmodel: {unit: relu}\ndynamics: {algorithm: gd}\n", [],
         "closed-form energy only for gaussian units"),
        ("task: {kind: gaussian_mixture, dim: 1}\nmodel: {unit: gaussian}\ndynamics: {algorithm: sgd}\n", [],
         "cannot be sampled"),
        ("", ["sweep.seeds=0"], "sweep.seeds: Input should be greater than or equal to 1"),
        ("", ["sweep.widths=[8, 16"], "not valid YAML"),
        ("", ["seeds"], "expected section.key=value"),
        ("sweep: {variants: [{name: a, set: {dynamics.lr: 0}}]}\n", [], "sweep.variants[0] (a): dynamics.lr"),
        ("sweep: {variants: [{name: a}, {name: a}]}\n", [], "variant names must be unique"),
        ("sweep: {variants: [{name: a, set: {sweep.seeds: 3}}]}\n", [],
         "sweep.variants[0] (a).set: 'sweep.seeds' applies to the whole sweep, not to one variant"),
        ("sweep: {variants: [{name: a}, {name: b, set: {execution: {dtype: float64, workers: 2}}}]}\n", [],
         "sweep.variants[1] (b).set: 'execution.workers' applies to the whole sweep"),
        ("sweep: {variants: [{name: a, set: {name: other}}]}\n", [], "'name' applies to the whole sweep"),
        ("dynamics: {steps: 10, birth_death: {quench: 20}}\n", [], "exceeds steps"),
        ("model: {init: {c_law: laplace}}\n", [], "model.init.c_law"),
        ("model: {init: {c_law: uniform, c_low: 1, c_high: -1}}\n", [], "model.init: c_low (1.0) must be < c_high"),
    ],
)
def test_bad_input_one_line(tmp_path: Path, yaml_text: str, overrides: list[str], needle: str) -> None:
    path = write(tmp_path, yaml_text) if yaml_text else None  # no file: the defaults (an empty file is an error)
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(path, overrides)
    msg = str(info.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(cfgmod.ConfigError, match="not found"):
        cfgmod.load(tmp_path / "nope.yaml")


def test_overrides_and_variants(tmp_path: Path) -> None:
    path = write(tmp_path, "sweep:\n  variants:\n    - name: plain\n    - name: bd\n"
                           "      set: {dynamics.birth_death.rate: 2.5, model.parametrization: ntk}\n")
    cfg = cfgmod.load(path, ["dynamics.lr=0.3", "sweep.widths=[64, 8, 32]"])
    assert cfg.dynamics.lr == 0.3
    assert cfg.sweep.widths == [8, 32, 64]  # sorted
    variants = dict(cfg.variant_configs())
    assert variants["plain"].dynamics.birth_death.rate == 0.0
    assert variants["bd"].dynamics.birth_death.rate == 2.5
    assert variants["bd"].model.parametrization.value == "ntk"
    assert variants["bd"].dynamics.lr == 0.3  # overrides reach every variant


def test_config_is_frozen() -> None:
    cfg = cfgmod.load(None)
    with pytest.raises(Exception, match="frozen"):
        cfg.dynamics.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "scaling").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_valid(path: Path) -> None:
    cfg = cfgmod.load(path)
    assert len(cfg.sweep.widths) >= 2
    # Each ships birth-death and a mean-field/ntk contrast.
    variants = dict(cfg.variant_configs())
    assert any(v.dynamics.birth_death.rate > 0 for v in variants.values())
    assert {v.model.parametrization.value for v in variants.values()} == {"mean_field", "ntk"}


def test_cli_exit_code_2_and_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "dynamics: {lr: -1}\n")
    code = main(["scaling", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "dynamics.lr" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_subprocess_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "modle: {unit: relu}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key 'modle'" in proc.stderr and "did you mean 'model'" in proc.stderr


def test_unreachable_tracking_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import free_port

    port = free_port()
    code = main(["scaling", "--set", "sweep.variants=[]", "--set", "sweep.widths=[8,16]", "--set", "sweep.seeds=1",
                 "--set", "dynamics.steps=5",
                 "--out", str(tmp_path / "o"), "--tracking-uri", f"http://127.0.0.1:{port}", "--backend", "local",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    assert f"127.0.0.1:{port}" in err and "--tracking-uri" in err


def test_validate_rejects_a_variant_key_that_cannot_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "sweep:\n  variants:\n    - name: a\n      set: {sweep.widths: [8, 16]}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'sweep.widths' applies to the whole sweep" in err


def test_variant_dtype_is_used_end_to_end() -> None:
    """A variant with execution.dtype float64 trains in float64: its final losses are those of a float64
    single-network pack, not of a float32 one (the base config stays float32)."""
    import torch

    from orchestrator.plan import plan_networks, plan_packs
    from orchestrator.pool import LocalPool
    from workers.engine import Pack
    from workers.jobs import PackEvent

    cfg = cfgmod.load(None, ["sweep.widths=[8,16]", "sweep.seeds=1", "dynamics.steps=40", "dynamics.eval_every=10",
                             "sweep.variants=[{name: f32}, {name: f64, set: {execution.dtype: float64}}]"])
    assert cfg.execution.dtype == "float32"
    nets = plan_networks(cfg)
    jobs = plan_packs(cfg, nets, n_workers=1, memory_bytes=8 << 30, checkpoint_dir=None)
    variant = {n.net_id: n.variant for n in nets}
    for job in jobs:
        assert {variant[s.net_id] for s in job.networks} == {"f64" if job.dtype == "float64" else "f32"}
    events: list[PackEvent] = []
    pool = LocalPool("cpu", max_retries=0)
    try:
        assert pool.run(jobs, events.append) == []
    finally:
        pool.close()
    final = {r.net_id: r.final_test_loss for ev in events for r in ev.report.retired}
    assert set(final) == set(variant)
    v = dict(cfg.variant_configs())

    def oracle(name: str, spec: object, dtype: torch.dtype) -> float:
        c = v[name]
        pack = Pack(c.task.spec(), c.model.spec(), c.dynamics.spec(), [spec], data_seed=cfg.sweep.seed, dtype=dtype)
        losses = [r.final_test_loss for rep in pack.train() for r in rep.retired]
        assert len(losses) == 1 and losses[0] is not None
        return float(losses[0])

    for n in nets:
        got = final[n.net_id]
        assert got is not None
        f64, f32 = oracle(n.variant, n.spec, torch.float64), oracle(n.variant, n.spec, torch.float32)
        assert abs(f64 - f32) > 1e-6 * abs(f64)  # the oracles tell the two precisions apart
        want, other = (f64, f32) if n.variant == "f64" else (f32, f64)
        assert got == pytest.approx(want, rel=1e-9 if n.variant == "f64" else 1e-6), n.key
        assert abs(got - want) < abs(got - other), n.key


def test_tracking_runs_takes_network_or_group_only() -> None:
    assert cfgmod.load(None).tracking.runs == "network"
    assert cfgmod.load(None, ["tracking.runs=group"]).tracking.runs == "group"
    with pytest.raises(cfgmod.ConfigError, match=r"tracking\.runs"):
        cfgmod.load(None, ["tracking.runs=seed"])
