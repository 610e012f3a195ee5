"""Records exchanged between the driver and the workers (frozen, picklable, no magic-key dicts)."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

from .engine import DynamicsSpec, ModelSpec, NetworkSpec, Report, TaskSpec


def _column(values: list[int]) -> Sequence[int]:
    """Ints in a flat array (8 bytes each) when they fit one, else a list."""
    try:
        return array("q", values)
    except OverflowError:
        return list(values)


class SpecTable(Sequence[NetworkSpec]):
    """A pack's networks held as columns (id, width, seed, which of the pack's distinct settings), built
    back into :class:`NetworkSpec` objects when read: ~30 bytes a network instead of ~230 for the spec
    objects, which is what a driver keeps for every queued network of a 100k-network sweep."""

    __slots__ = ("_ids", "_seeds", "_settings", "_which", "_widths")

    def __init__(self, specs: Iterable[NetworkSpec] = ()) -> None:
        settings: list[NetworkSpec] = []
        index: dict[NetworkSpec, int] = {}
        which: list[int] = []
        ids: list[int] = []
        widths: list[int] = []
        seeds: list[int] = []
        for sp in specs:
            own = replace(sp, net_id=0, width=1, seed=0)  # what networks of the pack may share
            k = index.get(own)
            if k is None:
                k = index[own] = len(settings)
                settings.append(own)
            which.append(k)
            ids.append(sp.net_id)
            widths.append(sp.width)
            seeds.append(sp.seed)
        self._settings = tuple(settings)
        self._which = array("I", which)
        self._ids, self._widths, self._seeds = _column(ids), _column(widths), _column(seeds)

    def __len__(self) -> int:
        return len(self._ids)

    def _spec(self, i: int) -> NetworkSpec:
        return replace(self._settings[self._which[i]], net_id=self._ids[i], width=self._widths[i],
                       seed=self._seeds[i])

    @overload
    def __getitem__(self, i: int) -> NetworkSpec: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[NetworkSpec, ...]: ...

    def __getitem__(self, i: int | slice) -> NetworkSpec | tuple[NetworkSpec, ...]:
        if isinstance(i, slice):
            return tuple(self._spec(j) for j in range(len(self))[i])
        return self._spec(range(len(self))[i])  # range: negative indices and IndexError as a tuple's

    def __iter__(self) -> Iterator[NetworkSpec]:
        return (self._spec(j) for j in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"SpecTable({list(self)!r})"

    def __getstate__(self) -> tuple[Any, ...]:
        return self._settings, self._which, self._ids, self._widths, self._seeds

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self._settings, self._which, self._ids, self._widths, self._seeds = state


@dataclass(frozen=True)
class PackJob:
    """One pack to train. Invariant: retrying a job resumes from ``checkpoint`` when that file exists."""

    pack_id: str
    task: TaskSpec
    model: ModelSpec
    dynamics: DynamicsSpec
    networks: Sequence[NetworkSpec]
    """The pack's networks, in net id order (a :class:`SpecTable` from the planner)."""
    data_seed: int
    dtype: str = "float32"
    kernel: str = "auto"
    """auto | torch | triton: which implementation runs the sampled-loss steps (see workers.engine.kernels)."""
    precision: str = "ieee"
    """ieee | tf32: float32 dot precision of the Triton kernels."""
    checkpoint: str | None = None
    """Path (shared by all nodes) of this pack's checkpoint file."""
    checkpoint_every: int = 200
    resend_after: int | None = None
    """A job run again after its worker was lost: the reports its checkpoint covers past this step (the last
    one the driver received) are sent again from the report log, since the lost worker may have emitted them
    without their reaching the driver. None: a first run, or a driver that reads the logs itself (resume)."""
    data: Any = field(default=None, compare=False, repr=False)
    """A dataset task's prepared arrays (a dict, see ``SplitArrays``), or a Ray ObjectRef to them: the driver
    reads the data once and ships it through Ray's object store. Never written to plan.json."""

    @property
    def cost(self) -> float:
        """Work in particle-steps (what the progress bar counts)."""
        return float(sum(sp.width for sp in self.networks) * self.dynamics.steps)


@dataclass(frozen=True)
class PackEvent:
    """A report of a pack, tagged with where and when it ran."""

    pack_id: str
    report: Report
    worker: str
    resumed_from: int
    """Step the pack started from in this attempt (0 = fresh)."""
    wall_s: float


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    node: str
    device: str
    memory_bytes: int
    """Device memory one pack may plan against (GPU memory, or this worker's share of the node's RAM)."""
