"""The user's own problem on the driver: a dataset read from a file, or a target function imported from Python.

Datasets are read, checked, split and standardised here, ONCE per driver (cached by file identity and
options), hashed, and shipped to the workers through Ray's object store (:class:`DataShipper`): a worker
never opens the user's file, which its node may not even see. Target functions are imported and called on
a probe batch at validation; their module reaches Ray workers through the runtime environment
(:func:`modules_for_workers` -> ``py_modules``).

Every problem is a :class:`DataError`, one line naming the file or key and the fix. Reading a dataset
needs numpy (and pandas/pyarrow for CSV/Parquet), never torch; checking a target function needs torch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.engine.specs import DataSpec

from .config import ConfigError

if TYPE_CHECKING:
    from workers.engine import TaskSpec
    from workers.jobs import PackJob

    from .config import TaskConfig

FORMATS = {".npz": "npz", ".npy": "npy", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
#: Top-level packages of mfsweep itself: installed on every worker, never shipped.
OWN_PACKAGES = frozenset({"workers", "orchestrator"})
PROBE_ROWS = 8


class DataError(ConfigError):
    """The user's data or target function is unusable; ``str(err)`` is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Options(DataSpec):
    """How a dataset file is read and prepared: the task's data spec and the split seed (the hashable key of
    the driver's cache)."""

    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Prepared:
    """The prepared arrays (float64: x_train, y_train, x_test, y_test) and the content hash of the data."""

    arrays: dict[str, np.ndarray]
    content_hash: str

    @property
    def sizes(self) -> dict[str, int]:
        a = self.arrays
        return {"dim": a["x_train"].shape[1], "out_dim": a["y_train"].shape[1],
                "n_train": a["x_train"].shape[0], "n_test": a["x_test"].shape[0]}


# --------------------------------------------------------------------------- reading


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def _shown(names: Iterable[object], limit: int = 8) -> str:
    text = [str(n) for n in names]
    more = f", ... ({len(text)} in all)" if len(text) > limit else ""
    return ", ".join(text[:limit]) + more


def _pick(table: Any, cols: Sequence[str | int], what: str, path: Path, key: str) -> np.ndarray:
    """Columns ``cols`` of a DataFrame (names) or a 2-D array (indices), as an (N, len(cols)) array."""
    if isinstance(table, np.ndarray):
        bad = [c for c in cols if not isinstance(c, int) or not -table.shape[1] <= c < table.shape[1]]
        if bad:
            raise DataError(f"task.{key}: {path.name} is a {table.shape[1]}-column .npy array; {what} must be "
                            f"column indices in [0, {table.shape[1]}), got {bad}")
        return np.asarray(table[:, [int(c) for c in cols]])
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise DataError(f"task.{key}: {path.name} has no column {_shown(missing)}; its columns are "
                        f"{_shown(table.columns)}")
    return np.asarray(table[list(cols)].to_numpy())


def _read_file(path: Path, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    """(x (N, d), y (N, k)) as stored: x numeric, y numeric or (classification) labels of any dtype."""
    where = "task.test_path" if opts.test_path and path == Path(opts.test_path) else "task.path"
    if not path.is_file():
        raise DataError(f"{where}: data file {path} not found; check the path (relative paths start from the "
                        "working directory)")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{where}: {path.name} has an unknown format '{path.suffix}'; use .npz, .npy, .csv or "
                        ".parquet")
    if fmt == "npz" and (opts.features or opts.targets):
        raise DataError("task.features: features and targets select columns of .npy/.csv/.parquet files; for "
                        ".npz name the arrays with task.x_key and task.y_key")
    try:
        if fmt == "npz":
            with np.load(path, allow_pickle=False) as arch:
                names = list(arch.files)
                for key, name in (("x_key", opts.x_key), ("y_key", opts.y_key)):
                    if name not in names:
                        raise DataError(f"task.{key}: {path.name} has no array '{name}'; its arrays are "
                                        f"{_shown(names)}")
                x, y = np.asarray(arch[opts.x_key]), np.asarray(arch[opts.y_key])
            table: Any = None
        elif fmt == "npy":
            table = np.load(path, allow_pickle=False)
            if table.ndim != 2:
                raise DataError(f"{where}: {path.name} holds a {table.ndim}-D array; a .npy dataset is one 2-D "
                                "array of rows (targets in task.targets columns, default the last)")
        else:
            import pandas as pd

            table = pd.read_csv(path) if fmt == "csv" else pd.read_parquet(path)
    except DataError:
        raise
    except Exception as err:  # any reader's failure: the file is not what its suffix says
        raise DataError(f"{where}: cannot read {path.name} as {fmt} ({_first_line(err)}); check the file") from None
    if table is not None:
        ncols = table.shape[1]
        if isinstance(table, np.ndarray):
            targets: Sequence[str | int] = opts.targets or (ncols - 1,)
            tset = {t % ncols for t in targets if isinstance(t, int)}
            features: Sequence[str | int] = opts.features or [i for i in range(ncols) if i not in tset]
        else:
            if not opts.targets:
                raise DataError(f"task.targets: name the target column(s) of {path.name}; its columns are "
                                f"{_shown(table.columns)}")
            targets = opts.targets
            features = opts.features or [c for c in table.columns if c not in set(targets)]
        if not features:
            raise DataError(f"task.features: {path.name} has no input column left besides the targets")
        x = _pick(table, features, "features", path, "features")
        y = _pick(table, targets, "targets", path, "targets")
    x = x.reshape(-1, 1) if x.ndim == 1 else x
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    if x.ndim != 2 or y.ndim != 2:
        raise DataError(f"{where}: {path.name}: inputs must be (N, d) and targets (N,) or (N, k); got shapes "
                        f"{x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: {path.name} has {x.shape[0]} input rows but {y.shape[0]} target rows; they "
                        "must have the same length")
    if x.shape[0] == 0:
        raise DataError(f"{where}: {path.name} has no rows")
    try:
        x = x.astype(np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {path.name}: the inputs are not all numeric; choose numeric columns with "
                        "task.features") from None
    if opts.classification:
        if y.shape[1] != 1:
            raise DataError(f"task.targets: classification needs one label column, got {y.shape[1]}")
    else:
        try:
            y = y.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{where}: {path.name}: the targets are not numeric; set task.classification=true "
                            "for labels") from None
    _check_finite(x, "inputs", path, where)
    if not opts.classification:
        _check_finite(y, "targets", path, where)
    elif y.dtype.kind == "f":
        _check_finite(y, "labels", path, where)
        if not np.all(y == np.round(y)):
            raise DataError(f"{where}: {path.name}: classification labels must be integers or strings, got "
                            f"non-integer values such as {y[y != np.round(y)][0]}")
    elif y.dtype == object and any(v is None or (isinstance(v, float) and not np.isfinite(v)) for v in y[:, 0]):
        raise DataError(f"{where}: {path.name}: some labels are missing (NaN/None); drop those rows")
    return x, y


def _check_finite(a: np.ndarray, what: str, path: Path, where: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(f"{where}: {path.name} has {int(bad.sum())} NaN/inf value(s) in the {what} (first in row "
                        f"{row}); clean or drop those rows")


def _hash_arrays(arrays: Iterable[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(json.dumps([list(a.shape), a.dtype.str]).encode())
        if a.dtype == object:
            h.update("\x1f".join(map(str, a.ravel())).encode())
        else:
            h.update(np.ascontiguousarray(a).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and scale both by the TRAINING mean and std (constant columns keep scale 1)."""
    mean = train.mean(0)
    std = train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (train - mean) / std, (test - mean) / std


def _one_hot(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([train[:, 0], test[:, 0]])
    classes = np.unique(labels.astype(str) if labels.dtype == object else labels)
    if classes.size < 2:
        raise DataError(f"task.classification: the labels take {classes.size} value(s); classification needs "
                        "at least two classes")

    def encode(y: np.ndarray) -> np.ndarray:
        col = y[:, 0].astype(str) if y.dtype == object else y[:, 0]
        return np.eye(classes.size)[np.searchsorted(classes, col)]

    return encode(train), encode(test)


def _stat_key(path: str | None) -> tuple[str, int, int] | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (path, -1, -1)
    return (path, st.st_mtime_ns, st.st_size)


def prepare(opts: Options) -> Prepared:
    """Read, check, split, standardise and encode the data named by ``opts`` (cached while the files are
    unchanged: validation, planning and shipping read each file once)."""
    return _prepare_cached(opts, _stat_key(opts.path), _stat_key(opts.test_path))


@functools.lru_cache(maxsize=4)
def _prepare_cached(opts: Options, _stat: object, _test_stat: object) -> Prepared:
    x, y = _read_file(Path(opts.path), opts)
    if opts.test_path is not None:
        x_te, y_te = _read_file(Path(opts.test_path), opts)
        if x_te.shape[1] != x.shape[1] or y_te.shape[1] != y.shape[1]:
            raise DataError(f"task.test_path: the test file has {x_te.shape[1]} inputs and {y_te.shape[1]} targets "
                            f"per row, the training file {x.shape[1]} and {y.shape[1]}; use files of the same "
                            "layout")
        content = _hash_arrays([x, y, x_te, y_te])
        x_tr, y_tr = x, y
    else:
        content = _hash_arrays([x, y])
        n = x.shape[0]
        n_test = round(opts.test_fraction * n)
        if n - n_test < 1:
            raise DataError(f"task.test_fraction={opts.test_fraction} leaves no training data ({n} rows); lower it "
                            "or give task.test_path")
        if n_test < 1:
            raise DataError(f"task.test_fraction={opts.test_fraction} leaves no test data ({n} rows); raise it or "
                            "give task.test_path")
        perm = np.random.default_rng(opts.seed).permutation(n)
        tr, te = perm[: n - n_test], perm[n - n_test :]
        x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    if opts.standardize_inputs:
        x_tr, x_te = _standardize(x_tr, x_te)
    if opts.classification:
        if opts.standardize_targets:
            raise DataError("task.standardize_targets does not apply to one-hot classification targets; set it "
                            "false")
        y_tr, y_te = _one_hot(y_tr, y_te)
    elif opts.standardize_targets:
        y_tr, y_te = _standardize(y_tr, y_te)
    arrays = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    for a in arrays.values():
        a.setflags(write=False)  # shared by every caller of the cache
    return Prepared(arrays, content)


def options_of(spec: TaskSpec) -> Options:
    """The reading options of a dataset task spec (what the driver ships for it)."""
    d = spec.data
    if d is None:
        raise DataError("task.kind=dataset needs task.path")
    return Options(**{f.name: getattr(d, f.name) for f in dataclasses.fields(d)}, seed=spec.seed)


# --------------------------------------------------------------------------- target functions


def _abs(path: str | None) -> str:
    return str(Path(path).expanduser().resolve()) if path else os.getcwd()


def load_target(target: str, module_dir: str | None) -> Any:
    """The callable named by ``target``, importable from ``module_dir`` (default: the working directory),
    which joins sys.path here as it would under ``python -m``."""
    where = _abs(module_dir)
    if not Path(where).is_dir():
        raise DataError(f"task.module_dir: {where} is not a directory; point it at the folder holding the "
                        "target's module")
    if where not in sys.path:
        sys.path.insert(0, where)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise DataError(f"task.target must look like 'package.module:function', got {target!r}")
    try:
        from workers.engine import import_target as engine_import

        return engine_import(target)
    except Exception as err:
        raise DataError(f"task.target: cannot import {target} ({_first_line(err)}); put its module under "
                        f"task.module_dir (now {where}) or install it") from None


def check_function(target: str, dim: int, inputs: str, module_dir: str | None) -> dict[str, Any]:
    """Import ``target``, call it on a probe batch from ``inputs``; its out_dim and the hash of its module."""
    import torch

    from workers.engine import InputDist
    from workers.engine.tasks import draw_inputs

    fn = load_target(target, module_dir)
    x = draw_inputs(InputDist(inputs), PROBE_ROWS, dim, torch.Generator().manual_seed(0), torch.device("cpu"),
                    torch.float32)
    try:
        y = torch.as_tensor(fn(x))
    except Exception as err:
        raise DataError(f"task.target: {target} raised on a ({PROBE_ROWS}, {dim}) float tensor ({_first_line(err)}); "
                        "it must map a (P, d) tensor to (P,) or (P, k)") from None
    if y.dim() not in (1, 2) or y.shape[0] != PROBE_ROWS:
        raise DataError(f"task.target: {target} returned shape {tuple(y.shape)} for inputs ({PROBE_ROWS}, {dim}); "
                        f"it must return ({PROBE_ROWS},) or ({PROBE_ROWS}, k)")
    if not torch.is_floating_point(y) or not bool(torch.isfinite(y).all()):
        raise DataError(f"task.target: {target} returned non-float or non-finite values on a probe batch; "
                        "it must return finite floats")
    module = sys.modules[target.partition(":")[0]]
    try:
        source = Path(inspect.getsourcefile(module) or "").read_bytes()
    except (TypeError, OSError):
        source = target.encode()
    return {"out_dim": 1 if y.dim() == 1 else int(y.shape[1]),
            "content_hash": "sha256:" + hashlib.sha256(source).hexdigest()[:16]}


def modules_for_workers(tasks: Iterable[TaskConfig]) -> list[str]:
    """Local paths to ship to Ray workers as ``py_modules``: the top-level package (a folder) or module (a
    .py file) of each function target found under its ``module_dir``. Installed packages are not shipped."""
    out: list[str] = []
    for t in tasks:
        if t.kind.value != "function" or not t.target:
            continue
        top = t.target.partition(":")[0].split(".")[0]
        if top in OWN_PACKAGES:
            continue
        spec = importlib.util.find_spec(top)
        if spec is None:
            continue
        if spec.submodule_search_locations:
            path = next(iter(spec.submodule_search_locations))
        elif spec.origin:
            path = spec.origin
        else:
            continue
        root = Path(_abs(t.module_dir))
        if Path(path).resolve().is_relative_to(root) and path not in out:
            out.append(path)
    return out


# --------------------------------------------------------------------------- config and shipping


def resolve(task: TaskConfig) -> dict[str, Any]:
    """The fields a dataset or function task fills in from its data or target (sizes, out_dim, content hash);
    a ``content_hash`` already set must match (resume on changed data is refused)."""
    kind = task.kind.value
    if kind == "dataset":
        if not task.path:
            raise DataError("task.kind=dataset needs task.path (a .npz, .npy, .csv or .parquet file)")
        opts = Options(path=_abs(task.path), test_path=_abs(task.test_path) if task.test_path else None,
                       x_key=task.x_key, y_key=task.y_key, features=tuple(task.features),
                       targets=tuple(task.targets), test_fraction=task.test_fraction, seed=task.seed,
                       standardize_inputs=task.standardize_inputs, standardize_targets=task.standardize_targets,
                       classification=task.classification)
        prep = prepare(opts)
        found = {**prep.sizes, "content_hash": prep.content_hash, "path": opts.path, "test_path": opts.test_path}
    elif kind == "function":
        if not task.target:
            raise DataError("task.kind=function needs task.target: 'package.module:function'")
        found = {**check_function(task.target, task.dim, task.inputs.value, task.module_dir),
                 "module_dir": _abs(task.module_dir)}
    else:
        user = [k for k in ("path", "test_path", "target", "module_dir") if getattr(task, k)]
        if user:
            raise DataError(f"task.{user[0]} is read only by task.kind=dataset/function, not {kind}; remove it "
                            "or set task.kind")
        return {}
    if task.content_hash and task.content_hash != found["content_hash"]:
        what = found.get("path") or task.target
        raise DataError(f"task.content_hash: {what} changed since this config was made ({found['content_hash']}, "
                        f"expected {task.content_hash}); restore it, or start a new sweep without content_hash")
    return found


class DataShipper:
    """Attaches a dataset task's prepared arrays to its pack jobs: one ``ray.put`` per dataset and driver
    (workers fetch them from the object store), or the arrays themselves for the local pool's worker process."""

    def __init__(self) -> None:
        self._data: dict[str, Any] = {}

    def data_for(self, spec: TaskSpec) -> Any:
        if spec.kind.value != "dataset":
            return None
        from workers.engine import to_dict

        key = json.dumps(to_dict(spec), sort_keys=True)
        if key not in self._data:
            prep = prepare(options_of(spec))
            if prep.content_hash != spec.content_hash:
                raise DataError(f"task.path: {spec.data.path if spec.data else '?'} changed since the sweep was "
                                f"planned ({prep.content_hash}, expected {spec.content_hash}); restore the file or "
                                "start a new sweep")
            import ray

            self._data[key] = ray.put(prep.arrays) if ray.is_initialized() else prep.arrays
        return self._data[key]

    def attach(self, job: PackJob) -> PackJob:
        data = self.data_for(job.task)
        return job if data is None else dataclasses.replace(job, data=data)
