"""The paper-reproduction configs stay valid, and the birth-death advantage of experiment 1 (ICML 2019,
example A) from the bad initialization still shows on a small size.

The small run goes through the real main job (``mfsweep scaling``, local backend) and reads its
summary.json, like a user would: n = 50 particles all started in the left well y ~ -2 + 0.1 N(0, 1), exact
energy, 4000 GD steps (the last 500 without birth-death). Plain GD (and the `clone` scheme, which only
copies stuck particles) stays in the local minimum; the `prior` scheme re-injects mass from U[-2, 2] and
gets far below it (about 20x at this size; the test asks for 5x).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from orchestrator import config as cfgmod
from orchestrator.cli import main as cli_main
from orchestrator.plan import plan_networks

ROOT = Path(__file__).resolve().parents[2]
PAPERS = sorted((ROOT / "configs" / "papers").glob("*.yaml"))


def test_there_are_paper_configs() -> None:
    names = {p.stem for p in PAPERS}
    assert {"bd_closed_form", "bd_closed_form_badinit", "bd_teacher", "bd_teacher_fullbatch", "spin3_width",
            "mf_vs_ntk_teacher", "bd_width_closed_form", "bd_width_teacher", "bd_teacher_notebook"} <= names


@pytest.mark.parametrize("path", PAPERS, ids=[p.stem for p in PAPERS])
def test_paper_config_loads_plans_and_round_trips(path: Path, tmp_path: Path) -> None:
    """Each paper config loads (loading enforces the rules: unique variants, quench <= steps, ...), runs the
    variants its file names, plans one network per (variant, width, seed), and survives the round trip through
    the config.yaml a run folder keeps for `mfsweep resume`."""
    cfg = cfgmod.load(path)
    raw = yaml.safe_load(path.read_text())
    named = [v["name"] for v in raw.get("sweep", {}).get("variants", [])]
    variants = cfg.variant_configs()
    assert [name for name, _ in variants] == (named or [variants[0][0]])
    nets = plan_networks(cfg)
    assert len(nets) == len(variants) * len(cfg.sweep.widths) * cfg.sweep.seeds
    assert len({n.key for n in nets}) == len(nets)
    kept = tmp_path / "config.yaml"
    kept.write_text(cfgmod.dump(cfg))
    assert cfgmod.load(kept) == cfg
    # Every config documents the command that runs it, and the results page shows it.
    text = path.read_text()
    assert f"mfsweep scaling configs/papers/{path.name}" in text, path
    assert f"configs/papers/{path.name}" in (ROOT / "docs" / "results.md").read_text(), path


@pytest.mark.parametrize("override", [
    ["dynamics.steps=100000", "dynamics.birth_death.quench=30000", "dynamics.eval_every=500"],  # bd_teacher full
])
def test_documented_full_size_overrides_validate(override: list[str]) -> None:
    cfgmod.load(ROOT / "configs" / "papers" / "bd_teacher.yaml", override).variant_configs()


def test_spin3_paper_size_override_validates() -> None:
    cfg = cfgmod.load(ROOT / "configs" / "papers" / "spin3_width.yaml",
                      ["task.dim=25", "task.n_train=65536", "sweep.widths=[64,128,256,512,1024,2048]",
                       "sweep.seeds=4"])
    assert cfg.task.dim == 25
    cfg.variant_configs()


def _final(summary: dict, variant: str) -> float:
    rec = next(v for v in summary["variants"] if v["name"] == variant)
    losses = [p["test_loss"] for p in rec["points"] if p["status"] == "finished"]
    assert losses and all(math.isfinite(x) for x in losses), rec
    return math.exp(sum(math.log(x) for x in losses) / len(losses))


def test_birth_death_prior_escapes_bad_init(tmp_path: Path) -> None:
    out = tmp_path / "badinit"
    rc = cli_main([
        "scaling", str(ROOT / "configs" / "papers" / "bd_closed_form_badinit.yaml"), "--out", str(out),
        "--backend", "local", "--no-progress",
        "--set", "sweep.widths=[50]", "--set", "sweep.seeds=2",
        "--set", "dynamics.steps=4000", "--set", "dynamics.birth_death.quench=500",
        "--set", "dynamics.eval_every=500", "--set", "execution.checkpoint_every=1000",
    ])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    gd, clone, prior = (_final(summary, v) for v in ("gd", "bd_clone", "bd_prior"))
    # GD stalls in the left well (energy ~1e-2); the prior scheme gets an order of magnitude below it.
    assert gd > 5e-3, gd
    assert prior < 0.2 * gd, (prior, gd)
    # The clone scheme cannot leave the well either: no better than half of GD's energy.
    assert clone > 0.5 * gd, (clone, gd)
