"""Planning: config -> networks -> packs sized to the workers' memory and balanced (:func:`plan`, the one
packing function of both ``mfsweep scaling`` and ``mfsweep search``).

Networks whose pack-level settings (task, unit, dynamics schedule, numerics: :func:`pack_key`) agree share
packs; their per-network settings (:data:`PER_NETWORK`) ride along as vectors.

To add a per-network hyperparameter: a field of NetworkSpec (workers/engine/specs.py) that names its config
path (``metadata=from_config("dynamics.x")``), used by the engine's per-network vectors (workers/engine/
pack.py); and, for a new key, its entry in orchestrator/config.py (type, bounds, doc). Nothing here changes:
:data:`PER_NETWORK`, :func:`network_spec`, :func:`network_settings` (MLflow params), search and the pack key
all follow from the field.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, overload

from workers.engine import Algorithm, NetworkSpec, TaskKind, Unit, derive_seed, from_dict, to_dict, traits
from workers.jobs import PackJob, SpecTable

from .config import ConfigError, ExecutionConfig, ScalingConfig
from .schema import at, build, driver_fields, paths

#: A network's own settings: NetworkSpec field -> the config path it is read from, as the field declares it
#: (workers/engine/specs.py). Networks that differ only in these share a pack (the engine holds them as
#: per-network vectors); every network's spec (:func:`network_spec`) and MLflow params
#: (:func:`network_settings`) follow from it.
PER_NETWORK: dict[str, str] = paths(NetworkSpec)
#: NetworkSpec fields that name a network rather than configure it (set by the planner).
IDENTITY: tuple[str, ...] = driver_fields(NetworkSpec)


def network_settings(vcfg: ScalingConfig) -> dict[str, Any]:
    """The per-network settings ``vcfg`` gives its networks (plain JSON values, e.g. for MLflow params)."""
    return {name: to_dict(at(vcfg, path)) for name, path in PER_NETWORK.items()}


def network_spec(vcfg: ScalingConfig, net_id: int, width: int, seed: int) -> NetworkSpec:
    """A network of ``vcfg`` (its per-network settings) of ``width``, its own stream seeded by ``seed``."""
    return build(NetworkSpec, vcfg, net_id=net_id, width=width, seed=seed)


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """One network of a sweep: where it belongs (variant, width, replicate) and its engine spec."""

    net_id: int
    variant: str
    replicate: int
    spec: NetworkSpec
    key: str
    """Stable name across resumes, e.g. 'bd/w0256/s02' (MLflow child-run key)."""


class SweepPlan(Sequence[NetworkPlan]):
    """Every network of a sweep in id order (variant, then width, then replicate), each built when asked: a
    network's plan is a function of the config and its id, so a driver holds none of them, whatever the
    sweep's size. A replicate's stream derives from (sweep seed, replicate) only, so variants and widths are
    paired (same seeds) for fair comparisons."""

    def __init__(self, cfg: ScalingConfig) -> None:
        self._variants = cfg.variant_configs()
        self._widths = list(cfg.sweep.widths)
        self._seeds = cfg.sweep.seeds
        self._sweep_seed = cfg.sweep.seed
        # One spec per variant: its networks' specs differ only in what the planner sets (id, width, seed).
        self._templates = [network_spec(v, 0, self._widths[0], 0) for _, v in self._variants] if self._widths else []

    def __len__(self) -> int:
        return len(self._variants) * len(self._widths) * self._seeds

    def _locate(self, net_id: int) -> tuple[int, int, int]:
        """(variant index, width, replicate) of ``net_id``."""
        if not 0 <= net_id < len(self):
            raise IndexError(f"no network {net_id} in a sweep of {len(self)}")
        vw, rep = divmod(net_id, self._seeds)
        vi, wi = divmod(vw, len(self._widths))
        return vi, self._widths[wi], rep

    def variant_width(self, net_id: int) -> tuple[str, int]:
        """(variant, width) of ``net_id``, by arithmetic: what the report path needs of a network."""
        vi, width, _ = self._locate(net_id)
        return self._variants[vi][0], width

    def variant(self, net_id: int) -> str:
        return self.variant_width(net_id)[0]

    def group(self, net_id: int) -> str:
        """The (variant, width) a network belongs to, as its key names it: 'bd/w0256'."""
        variant, width = self.variant_width(net_id)
        return f"{variant}/w{width:05d}"

    @overload
    def __getitem__(self, net_id: int) -> NetworkPlan: ...

    @overload
    def __getitem__(self, net_id: slice) -> list[NetworkPlan]: ...

    def __getitem__(self, net_id: int | slice) -> NetworkPlan | list[NetworkPlan]:
        if isinstance(net_id, slice):
            return [self[i] for i in range(len(self))[net_id]]
        if net_id < 0:
            net_id += len(self)
        vi, width, rep = self._locate(net_id)
        spec = replace(self._templates[vi], net_id=net_id, width=width, seed=derive_seed(self._sweep_seed, rep))
        name = self._variants[vi][0]
        return NetworkPlan(net_id, name, rep, spec, f"{name}/w{width:05d}/s{rep:02d}")


def plan_networks(cfg: ScalingConfig) -> SweepPlan:
    """Every network of the sweep with a stable id (:class:`SweepPlan`: built when asked)."""
    return SweepPlan(cfg)


def pack_key(vcfg: ScalingConfig) -> str:
    """Pack-level settings: networks may share a pack only when these agree."""
    ex = vcfg.execution
    return json.dumps([to_dict(vcfg.task.spec()), to_dict(vcfg.model.spec()), to_dict(vcfg.dynamics.spec()),
                       ex.dtype, ex.kernel, ex.precision], sort_keys=True)


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


def _exact_and_batch(vcfg: ScalingConfig) -> tuple[bool, int]:
    """Whether a pack trains on the exact energy (as ``uses_exact_energy``), and its batch per step."""
    gd = vcfg.dynamics.algorithm is Algorithm.GD
    exact = gd and traits(vcfg.task.spec()).has_closed_form and vcfg.model.unit is Unit.GAUSSIAN
    return exact, vcfg.task.n_train if gd and not exact else vcfg.dynamics.batch_size


def pack_memory(vcfg: ScalingConfig) -> Callable[[Sequence[int]], int]:
    """Peak bytes of a pack of networks of the given widths under ``vcfg``'s pack-level settings (from the
    specs alone: no task is built, so an absurd width or dimension is caught before any tensor exists)."""
    from workers.engine import estimate_pack_bytes
    from workers.engine.memory import DTYPE_BYTES

    task_spec = vcfg.task.spec()
    tr = traits(task_spec)
    exact, batch = _exact_and_batch(vcfg)
    dtype = vcfg.execution.dtype

    # The task's own tensors (estimate_pack_bytes counts the networks): the 3-spin couplings (d^3), the
    # teacher, and the fixed training and test sets. They matter at absurd dimensions, where building the
    # task alone would exhaust a worker.
    coeffs = {TaskKind.SPHERICAL_3SPIN: tr.dim**3, TaskKind.TEACHER: task_spec.teacher_units * (tr.dim + tr.out_dim)}
    task_items = coeffs.get(task_spec.kind, 0) + (task_spec.n_train + task_spec.n_test) * (tr.dim + tr.out_dim)
    task_bytes = task_items * DTYPE_BYTES[dtype]

    def mem(widths: Sequence[int]) -> int:
        return task_bytes + estimate_pack_bytes(widths, batch=batch, dim=tr.dim, out_dim=tr.out_dim, dtype=dtype,
                                                exact=exact, n_test=task_spec.n_test)

    return mem


def check_fits(cfg: ScalingConfig, memory_bytes: int, widths: Sequence[int],
               mem: Callable[[Sequence[int]], int] | None = None, where: str = "a worker") -> None:
    """ConfigError (one line) unless a pack of the widest of ``widths`` alone fits ``memory_fraction`` of
    ``memory_bytes``, for every variant (or for ``mem`` alone)."""
    budget = memory_bytes * cfg.execution.memory_fraction
    mems = [mem] if mem is not None else [pack_memory(v) for _, v in cfg.variant_configs()]
    for m in mems:
        for w in sorted(set(widths), reverse=True)[:1]:  # the widest network needs the most
            need = m([w])
            if need > budget:
                raise ConfigError(
                    f"width {w} needs ~{need / 2**30:.1f} GiB, more than the {budget / 2**30:.1f} GiB "
                    f"{where} may use (execution.memory_fraction={cfg.execution.memory_fraction} of "
                    f"{memory_bytes / 2**30:.1f} GiB); lower the width, task.dim or dynamics.batch_size, or "
                    "raise execution.memory_fraction")


@dataclass(frozen=True)
class Packing:
    """What :func:`plan` made of a set of networks."""

    jobs: list[PackJob]
    """The packs, longest first."""
    too_wide: list[tuple[NetworkSpec, str]]
    """Networks that alone exceed what a worker may use, with the reason (in no pack)."""


def plan(networks: Sequence[tuple[ScalingConfig, NetworkSpec]], *, n_workers: int, memory_bytes: int,
         execution: ExecutionConfig, data_seed: int, pack_id: Callable[[int], str],
         checkpoint_dir: Path | None = None) -> Packing:
    """Packs of ``networks`` (each with the resolved config it belongs to): networks with the same
    :func:`pack_key` share packs, each pack within ``execution.memory_fraction`` of ``memory_bytes`` and
    ``execution.max_networks_per_pack``, at least ``n_workers`` packs in all when there are enough networks,
    balanced by cost (longest-processing-time first). A pack runs with its configs' numerics (dtype, kernel,
    precision: part of the pack key) and ``execution``'s pool settings; ``pack_id(i)`` names the i-th pack."""
    groups: dict[str, list[tuple[ScalingConfig, NetworkSpec]]] = {}
    for vcfg, spec in networks:
        groups.setdefault(pack_key(vcfg), []).append((vcfg, spec))
    budget = memory_bytes * execution.memory_fraction
    limit = execution.max_networks_per_pack
    jobs: list[PackJob] = []
    too_wide: list[tuple[NetworkSpec, str]] = []
    for members in groups.values():
        vcfg = members[0][0]
        task_spec, model, dyn = vcfg.task.spec(), vcfg.model.spec(), vcfg.dynamics.spec()
        batch = _exact_and_batch(vcfg)[1]
        mem = pack_memory(vcfg)
        fitting: list[NetworkSpec] = []
        for _, spec in members:
            need = mem([spec.width])
            if need > budget:
                too_wide.append((spec, f"width {spec.width} needs ~{need / 2**30:.1f} GiB, more than the "
                                       f"{budget / 2**30:.1f} GiB a worker may use"))
            else:
                fitting.append(spec)
        if not fitting:
            continue
        share = max(1, round(n_workers * len(fitting) / max(1, len(networks))))
        n_bins = min(len(fitting), max(share, math.ceil(len(fitting) / limit)))

        def cost(sp: NetworkSpec, _b: int = batch) -> float:
            return _network_cost(sp, _b)

        def fits(b: list[NetworkSpec], _m: Callable[[Sequence[int]], int] = mem) -> bool:
            return _m([sp.width for sp in b]) <= budget and len(b) <= limit

        for b in balance(fitting, cost, n_bins, fits):
            pid = pack_id(len(jobs))
            jobs.append(PackJob(
                pack_id=pid, task=task_spec, model=model, dynamics=dyn,
                networks=SpecTable(sorted(b, key=lambda s: s.net_id)), data_seed=data_seed,
                # The configs' numerics (the pack key groups by them), the run's pool settings.
                dtype=vcfg.execution.dtype, kernel=vcfg.execution.kernel, precision=vcfg.execution.precision,
                checkpoint=str(checkpoint_dir / f"{pid}.pt") if checkpoint_dir else None,
                checkpoint_every=execution.checkpoint_every,
            ))
    jobs.sort(key=lambda j: -j.cost)  # longest first: better balance on the pool
    return Packing(jobs, too_wide)


def plan_packs(cfg: ScalingConfig, networks: Sequence[NetworkPlan], *, n_workers: int, memory_bytes: int,
               checkpoint_dir: Path | None, skip: set[int] | frozenset[int] = frozenset()) -> list[PackJob]:
    """A sweep's packs (:func:`plan`) of its networks not in ``skip``; a network too wide for a worker is a
    ConfigError (one line naming the fix)."""
    variants = dict(cfg.variant_configs())
    todo = [(variants[n.variant], n.spec) for n in networks if n.net_id not in skip]
    by_key: dict[str, list[tuple[ScalingConfig, NetworkSpec]]] = {}
    for vcfg, spec in todo:
        by_key.setdefault(pack_key(vcfg), []).append((vcfg, spec))
    for members in by_key.values():
        check_fits(cfg, memory_bytes, [sp.width for _, sp in members], pack_memory(members[0][0]))
    return plan(todo, n_workers=n_workers, memory_bytes=memory_bytes, execution=cfg.execution,
                data_seed=cfg.sweep.seed, pack_id=lambda i: f"p{i:04d}", checkpoint_dir=checkpoint_dir).jobs


def save_jobs(jobs: Sequence[PackJob], path: Path) -> None:
    """plan.json: a JSON array with one pack per line, written a pack at a time (a 100k-network plan as one
    string would be a ~100 MB transient in the driver) to a temporary file moved into place (a driver killed
    while writing leaves the old plan)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write("[\n")
        for i, j in enumerate(jobs):
            fh.write(",\n" if i else "")
            json.dump({"pack_id": j.pack_id, "task": to_dict(j.task), "model": to_dict(j.model),
                       "dynamics": to_dict(j.dynamics), "networks": [to_dict(n) for n in j.networks],
                       "data_seed": j.data_seed, "dtype": j.dtype, "kernel": j.kernel, "precision": j.precision,
                       "checkpoint": j.checkpoint, "checkpoint_every": j.checkpoint_every}, fh)
        fh.write("\n]\n")
    tmp.replace(path)


def _job_dicts(path: Path) -> Iterator[dict[str, Any]]:
    """plan.json's packs, read a line at a time (a plan written as one indented document by an earlier
    version is read whole)."""
    with path.open() as fh:
        head = [fh.readline(), fh.readline()]
        if head[0].strip() == "[" and head[1].startswith("{"):  # a pack per line
            for line in itertools.chain(head[1:], fh):
                line = line.strip().removesuffix(",")
                if line and line != "]":
                    yield json.loads(line)
            return
    yield from json.loads(path.read_text())


def load_jobs(path: Path) -> list[PackJob]:
    from workers.engine import DynamicsSpec, ModelSpec, TaskSpec

    out = []
    for d in _job_dicts(path):
        out.append(PackJob(
            pack_id=d["pack_id"], task=from_dict(TaskSpec, d["task"]), model=from_dict(ModelSpec, d["model"]),
            dynamics=from_dict(DynamicsSpec, d["dynamics"]),
            networks=SpecTable(from_dict(NetworkSpec, n) for n in d["networks"]), data_seed=d["data_seed"],
            dtype=d["dtype"], kernel=d.get("kernel", "auto"), precision=d.get("precision", "ieee"),
            checkpoint=d["checkpoint"], checkpoint_every=d["checkpoint_every"]))
    return out
