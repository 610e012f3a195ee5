"""Planning: widths x seeds x variants -> networks -> packs sized to the workers' memory and balanced.

Networks of variants whose pack-level settings (task, unit, dynamics schedule) agree share packs; their
per-network settings (dt, parametrization, temperature, birth-death rate and scheme) ride along as vectors.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from workers.engine import (
    NetworkSpec,
    Task,
    derive_seed,
    estimate_pack_bytes,
    from_dict,
    make_task,
    to_dict,
    uses_exact_energy,
)
from workers.jobs import PackJob

from .config import ScalingConfig


@dataclass(frozen=True)
class NetworkPlan:
    """One network of a sweep: where it belongs (variant, width, replicate) and its engine spec."""

    net_id: int
    variant: str
    replicate: int
    spec: NetworkSpec
    key: str
    """Stable name across resumes, e.g. 'bd/w0256/s02' (MLflow child-run key)."""


def plan_networks(cfg: ScalingConfig) -> list[NetworkPlan]:
    """Every network of the sweep with a stable id. A replicate's stream derives from (sweep seed,
    replicate) only, so variants and widths are paired (same seeds) for fair comparisons."""
    out: list[NetworkPlan] = []
    for name, vcfg in cfg.variant_configs():
        dyn, bd = vcfg.dynamics, vcfg.dynamics.birth_death
        for width in cfg.sweep.widths:
            for rep in range(cfg.sweep.seeds):
                spec = NetworkSpec(
                    net_id=len(out), width=width, seed=derive_seed(cfg.sweep.seed, rep), lr=dyn.lr,
                    parametrization=vcfg.model.parametrization, temperature=dyn.temperature,
                    bd_rate=bd.rate, bd_scheme=bd.scheme,
                )
                out.append(NetworkPlan(len(out), name, rep, spec, f"{name}/w{width:05d}/s{rep:02d}"))
    return out


def _pack_key(vcfg: ScalingConfig) -> str:
    """Pack-level settings: networks may share a pack only when these agree."""
    return json.dumps([to_dict(vcfg.task.spec()), to_dict(vcfg.model.spec()), to_dict(vcfg.dynamics.spec()),
                       vcfg.execution.dtype], sort_keys=True)


def _network_cost(spec: NetworkSpec, batch: int) -> float:
    return float(spec.width * batch)


T = TypeVar("T")


def balance(items: Sequence[T], cost: Callable[[T], float], n_bins: int,
            fits: Callable[[list[T]], bool]) -> list[list[T]]:
    """Longest-processing-time-first bins of ``items``, the bin count doubled until every bin ``fits``
    (at worst one item per bin); empty bins are dropped."""
    ordered = sorted(items, key=lambda it: -cost(it))
    n_bins = max(1, min(len(items), n_bins))
    while True:
        bins: list[list[T]] = [[] for _ in range(n_bins)]
        loads = [0.0] * n_bins
        for it in ordered:
            i = min(range(n_bins), key=lambda j: (loads[j], len(bins[j])))
            bins[i].append(it)
            loads[i] += cost(it)
        if n_bins == len(items) or all(fits(b) for b in bins):
            return [b for b in bins if b]
        n_bins = min(len(items), n_bins * 2)


def plan_packs(cfg: ScalingConfig, networks: Sequence[NetworkPlan], *, n_workers: int, memory_bytes: int,
               checkpoint_dir: Path | None, skip: set[int] | frozenset[int] = frozenset()) -> list[PackJob]:
    """Packs of the networks not in ``skip``, each within ``memory_fraction`` of ``memory_bytes``, at least
    ``n_workers`` of them when there are enough networks, balanced by cost (longest-processing-time first)."""
    variants = dict(cfg.variant_configs())
    groups: dict[str, list[NetworkPlan]] = {}
    for net in networks:
        if net.net_id not in skip:
            groups.setdefault(_pack_key(variants[net.variant]), []).append(net)
    budget = memory_bytes * cfg.execution.memory_fraction
    jobs: list[PackJob] = []
    for nets in groups.values():
        vcfg = variants[nets[0].variant]
        task_spec, model, dyn = vcfg.task.spec(), vcfg.model.spec(), vcfg.dynamics.spec()
        task = make_task(task_spec)
        exact = uses_exact_energy(task, model, dyn)
        batch = task_spec.n_train if dyn.algorithm.value == "gd" and not exact else dyn.batch_size
        dtype = cfg.execution.dtype

        def mem(ws: Sequence[int], _b: int = batch, _t: Task = task, _e: bool = exact, _dt: str = dtype,
                _nt: int = task_spec.n_test) -> int:
            import torch

            return estimate_pack_bytes(ws, batch=_b, dim=_t.dim, out_dim=_t.out_dim, dtype=getattr(torch, _dt),
                                       exact=_e, n_test=_nt)

        for single in nets:
            if mem([single.spec.width]) > budget:
                raise ValueError(
                    f"width {single.spec.width} needs ~{mem([single.spec.width]) / 2**30:.1f} GiB, more than "
                    f"{budget / 2**30:.1f} GiB a worker may use; lower dynamics.batch_size or the width, or "
                    "raise execution.memory_fraction")
        limit = cfg.execution.max_networks_per_pack
        share = max(1, round(n_workers * len(nets) / max(1, len(networks) - len(skip))))
        n_bins = min(len(nets), max(share, math.ceil(len(nets) / cfg.execution.max_networks_per_pack)))
        def cost(p: NetworkPlan, _b: int = batch) -> float:
            return _network_cost(p.spec, _b)

        def fits(b: list[NetworkPlan], _m: Callable[[Sequence[int]], int] = mem, _l: int = limit) -> bool:
            return _m([p.spec.width for p in b]) <= budget and len(b) <= _l

        for b in balance(nets, cost, n_bins, fits):
            pack_id = f"p{len(jobs):04d}"
            jobs.append(PackJob(
                pack_id=pack_id, task=task_spec, model=model, dynamics=dyn,
                networks=tuple(sorted((p.spec for p in b), key=lambda s: s.net_id)),
                data_seed=cfg.sweep.seed, dtype=dtype, kernel=cfg.execution.kernel,
                precision=cfg.execution.precision,
                checkpoint=str(checkpoint_dir / f"{pack_id}.pt") if checkpoint_dir else None,
                checkpoint_every=cfg.execution.checkpoint_every,
            ))
    jobs.sort(key=lambda j: -j.cost)  # longest first: better balance on the pool
    return jobs


def save_jobs(jobs: Sequence[PackJob], path: Path) -> None:
    data = [{"pack_id": j.pack_id, "task": to_dict(j.task), "model": to_dict(j.model),
             "dynamics": to_dict(j.dynamics), "networks": [to_dict(n) for n in j.networks],
             "data_seed": j.data_seed, "dtype": j.dtype, "kernel": j.kernel, "precision": j.precision,
             "checkpoint": j.checkpoint,
             "checkpoint_every": j.checkpoint_every} for j in jobs]
    path.write_text(json.dumps(data, indent=1))


def load_jobs(path: Path) -> list[PackJob]:
    from workers.engine import DynamicsSpec, ModelSpec, TaskSpec

    out = []
    for d in json.loads(path.read_text()):
        out.append(PackJob(
            pack_id=d["pack_id"], task=from_dict(TaskSpec, d["task"]), model=from_dict(ModelSpec, d["model"]),
            dynamics=from_dict(DynamicsSpec, d["dynamics"]),
            networks=tuple(from_dict(NetworkSpec, n) for n in d["networks"]), data_seed=d["data_seed"],
            dtype=d["dtype"], kernel=d.get("kernel", "auto"), precision=d.get("precision", "ieee"),
            checkpoint=d["checkpoint"], checkpoint_every=d["checkpoint_every"]))
    return out
