"""execution.kernel / execution.precision: validated in the config, carried by every planned job to the Pack."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from orchestrator import config as cfgmod
from orchestrator.plan import load_jobs, plan_networks, plan_packs, save_jobs
from workers.runner import PackRunner


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["execution.kernel=cuda"], "execution.kernel: Input should be 'auto', 'torch' or 'triton'"),
        (["execution.precision=fp16"], "execution.precision: Input should be 'ieee' or 'tf32'"),
        (["execution.kernel=triton", "execution.device=cpu"], "kernel=triton runs on CUDA only"),
    ],
)
def test_bad_kernel_settings_are_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(cfgmod.ConfigError) as info:
        cfgmod.load(None, overrides)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_kernel_reaches_the_pack(tmp_path: Path) -> None:
    cfg = cfgmod.load(None, ["execution.kernel=torch", "execution.precision=tf32", "sweep.widths=[4, 8]",
                             "sweep.seeds=1", "sweep.variants=[]", "dynamics.steps=2", "dynamics.eval_every=2"])
    jobs = plan_packs(cfg, plan_networks(cfg), n_workers=1, memory_bytes=2**30, checkpoint_dir=None)
    save_jobs(jobs, tmp_path / "plan.json")
    loaded = load_jobs(tmp_path / "plan.json")
    assert {(j.kernel, j.precision) for j in [*jobs, *loaded]} == {("torch", "tf32")}
    defaults = plan_packs(cfgmod.load(None), plan_networks(cfgmod.load(None)), n_workers=1, memory_bytes=2**30,
                          checkpoint_dir=None)
    assert {(j.kernel, j.precision) for j in defaults} == {("auto", "ieee")}
    # The worker builds its pack with the job's kernel (an unknown name fails there: it was passed on).
    with pytest.raises(ValueError, match=r"execution\.kernel must be one of"):
        next(iter(PackRunner("cpu").train(dataclasses.replace(loaded[0], kernel="nonsense"))))
