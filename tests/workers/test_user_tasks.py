"""The user's problem in the engine: dataset tasks (read by the driver from .npz/.csv/.parquet, split and
standardised on the training part only) and function tasks (a callable from a test module), checked against
numpy oracles and against the plain nn.Module + torch.optim.SGD loop of engine_ref."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.userdata import Options, prepare
from tests.workers.engine_ref import DEVICE, F64, RefNet, raw_lr, ref_loss
from workers.engine import (
    Algorithm,
    DataSpec,
    DataStream,
    DynamicsSpec,
    InputDist,
    ModelSpec,
    NetworkSpec,
    Pack,
    Parametrization,
    TaskKind,
    TaskSpec,
    make_task,
)

N, D, K = 120, 4, 2
FEATURES = [f"f{i}" for i in range(D)]
TARGETS = [f"t{j}" for j in range(K)]


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x ~ N(1, 2^2) and a linear-plus-ReLU target y = x A + relu(x B) (2 outputs)."""
    rng = np.random.default_rng(seed)
    x = 1.0 + 2.0 * rng.standard_normal((N, D))
    a, b = rng.standard_normal((D, K)), rng.standard_normal((D, K))
    return x, x @ a + np.maximum(x @ b, 0.0)


def write_all(tmp: Path, x: np.ndarray, y: np.ndarray, stem: str = "data") -> dict[str, Path]:
    frame = pd.DataFrame(np.hstack([x, y]), columns=FEATURES + TARGETS)
    paths = {"npz": tmp / f"{stem}.npz", "csv": tmp / f"{stem}.csv", "parquet": tmp / f"{stem}.parquet"}
    np.savez(paths["npz"], x=x, y=y)
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    return paths


def opts(path: Path, **kw: object) -> Options:
    cols = {} if path.suffix == ".npz" else {"targets": tuple(TARGETS)}
    return Options(str(path), **{**cols, **kw})  # type: ignore[arg-type]


def dataset_spec(o: Options, sizes: dict[str, int], content_hash: str) -> TaskSpec:
    data = DataSpec(path=o.path, test_path=o.test_path, targets=o.targets, test_fraction=o.test_fraction,
                    standardize_inputs=o.standardize_inputs, standardize_targets=o.standardize_targets)
    return TaskSpec(kind=TaskKind.DATASET, seed=o.seed, data=data, content_hash=content_hash, **sizes)


def test_same_tensors_from_npz_csv_parquet(tmp_path: Path) -> None:
    x, y = planted()
    paths = write_all(tmp_path, x, y)
    sets = {}
    for fmt, path in paths.items():
        o = opts(path, seed=3, standardize_targets=True)
        prep = prepare(o)
        task = make_task(dataset_spec(o, prep.sizes, prep.content_hash), DEVICE, F64, prep.arrays)
        sets[fmt] = (*task.train_set(), *task.test_set(), prep.content_hash)
    n_test = round(0.25 * N)
    assert sets["npz"][0].shape == (N - n_test, D) and sets["npz"][3].shape == (n_test, K)
    for fmt in ("csv", "parquet"):
        for got, want in zip(sets[fmt][:4], sets["npz"][:4], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert sets[fmt][4] == sets["npz"][4]  # the content hash names the data, not its file format
    # The split is a permutation of the rows: every (x, y) row lands in exactly one part.
    x_all = torch.cat([sets["npz"][0], sets["npz"][2]])
    assert x_all.shape == (N, D)


def test_standardization_uses_training_statistics_only(tmp_path: Path) -> None:
    x, y = planted(1)
    # A planted test file far from the training data: standardising with its own (or pooled) statistics
    # would bring it near 0; training statistics leave it near +50 / std.
    x_te, y_te = x[:30] + 50.0, y[:30] - 80.0
    train, test = write_all(tmp_path, x, y, "train"), write_all(tmp_path, x_te, y_te, "test")
    o = opts(train["csv"], test_path=str(test["csv"]), standardize_targets=True)
    arr = prepare(o).arrays
    mx, sx, my, sy = x.mean(0), x.std(0), y.mean(0), y.std(0)
    np.testing.assert_allclose(arr["x_train"], (x - mx) / sx, rtol=1e-12)
    np.testing.assert_allclose(arr["x_test"], (x_te - mx) / sx, rtol=1e-12)
    np.testing.assert_allclose(arr["y_test"], (y_te - my) / sy, rtol=1e-12)
    assert float(arr["x_test"].mean()) > 10.0  # far from the training data, as planted

    # Split case: a planted outlier row that lands in the test part. Training statistics exclude it, so it
    # stays ~1e4 / 2 standard deviations out (pooled statistics would shrink it to ~sqrt(N)).
    x2 = x.copy()
    x2[7, 0] = 1e4
    np.savez(tmp_path / "outlier.npz", x=x2, y=y)
    seed = next(s for s in range(100)
                if 1e4 in prepare(Options(str(tmp_path / "outlier.npz"), seed=s, standardize_inputs=False))
                .arrays["x_test"])
    raw = prepare(Options(str(tmp_path / "outlier.npz"), seed=seed, standardize_inputs=False)).arrays
    std = prepare(Options(str(tmp_path / "outlier.npz"), seed=seed)).arrays
    m, s = raw["x_train"].mean(0), raw["x_train"].std(0)
    np.testing.assert_allclose(std["x_train"], (raw["x_train"] - m) / s, rtol=1e-12)
    np.testing.assert_allclose(std["x_test"], (raw["x_test"] - m) / s, rtol=1e-12)
    assert std["x_test"][:, 0].max() > 1e3


def test_classification_labels_become_one_hot(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 3))
    labels = np.array(["cat", "dog", "emu"])[rng.integers(0, 3, 60)]
    pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "kind": labels}).to_csv(tmp_path / "l.csv", index=False)
    prep = prepare(Options(str(tmp_path / "l.csv"), targets=("kind",), classification=True, test_fraction=0.5,
                           standardize_inputs=False))
    label_of = {tuple(row): lab for row, lab in zip(x.tolist(), labels, strict=True)}
    for split in ("train", "test"):
        xs, ys = prep.arrays[f"x_{split}"], prep.arrays[f"y_{split}"]
        assert ys.shape == (xs.shape[0], 3)
        for row, onehot in zip(xs.tolist(), ys.tolist(), strict=True):
            want = ["cat", "dog", "emu"].index(label_of[tuple(row)])  # one column per class, sorted labels
            assert onehot == [1.0 if j == want else 0.0 for j in range(3)]


@pytest.mark.parametrize("algorithm,finite", [(Algorithm.GD, False), (Algorithm.SGD, True)])
def test_packed_dataset_matches_nn_module_loop(tmp_path: Path, algorithm: Algorithm, finite: bool) -> None:
    x, y = planted(4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    o = Options(str(tmp_path / "d.npz"), standardize_targets=True, seed=1)
    prep = prepare(o)
    spec = dataset_spec(o, prep.sizes, prep.content_hash)
    model = ModelSpec()
    dyn = DynamicsSpec(algorithm=algorithm, steps=10, batch_size=16, finite_set=finite, eval_every=5)
    nets = [NetworkSpec(net_id=i, width=w, seed=s, lr=0.2 if p is Parametrization.MEAN_FIELD else 0.1,
                        parametrization=p)
            for i, (w, s, p) in enumerate([(w, s, p) for w in (5, 12) for s in (1, 2)
                                           for p in (Parametrization.MEAN_FIELD, Parametrization.NTK)])]
    pack = Pack(spec, model, dyn, nets, data_seed=7, device=DEVICE, dtype=F64, data=prep.arrays)
    init = {i: pack.particles(i) for i in pack.running}
    for _ in range(dyn.steps):
        pack.step_once()
    test_losses = pack.test_losses()
    # Oracle: each network alone, an nn.Module with torch.optim.SGD, batches from its own copy of the stream
    # (a separately built task), test loss on the numpy test arrays.
    ref_task = make_task(spec, DEVICE, F64, {k: v.copy() for k, v in prep.arrays.items()})
    x_te = torch.tensor(prep.arrays["x_test"], dtype=F64, device=DEVICE)
    y_te = torch.tensor(prep.arrays["y_test"], dtype=F64, device=DEVICE)
    moved = 0.0
    for sp in nets:
        stream = DataStream(ref_task, dyn, 7, exact=False)
        net = RefNet(model, sp, *init[sp.net_id])
        opt = torch.optim.SGD(net.parameters(), lr=raw_lr(sp))
        for _ in range(dyn.steps):
            batch = stream.next()
            assert batch is not None
            opt.zero_grad()
            ref_loss(net(batch[0]), batch[1]).backward()
            opt.step()
        with torch.no_grad():
            want = float(ref_loss(net(x_te), y_te))
        assert test_losses[sp.net_id] == pytest.approx(want, rel=1e-8, abs=1e-12)
        z, _, c = pack.particles(sp.net_id)
        torch.testing.assert_close(z, net.z.detach(), rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(c, net.c.detach(), rtol=1e-8, atol=1e-12)
        moved = max(moved, float((net.z.detach() - init[sp.net_id][0]).abs().max()))
    assert moved > 1e-5


def cubic_sum(x: torch.Tensor) -> torch.Tensor:
    """A target function defined in this test module: (P, d) -> (P, 2)."""
    return torch.stack([x.pow(3).sum(1), torch.relu(x[:, 0])], dim=1)


@pytest.mark.parametrize("inputs", list(InputDist))
def test_function_task_samples_its_input_law(inputs: InputDist) -> None:
    spec = TaskSpec(kind=TaskKind.FUNCTION, dim=3, out_dim=2, inputs=inputs, n_train=4000, n_test=50,
                    target=f"{__name__}:cubic_sum")
    task = make_task(spec, DEVICE, F64)
    x, y = task.train_set()
    torch.testing.assert_close(y, cubic_sum(x))
    norms = x.pow(2).sum(1)
    if inputs is InputDist.SPHERE:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    elif inputs is InputDist.UNIFORM_BOX:
        assert float(x.abs().max()) <= 1.0 and float(x.abs().max()) > 0.95
    # E|x|^2 (the automatic init scale) matches the law: d, 1 or d/3.
    assert float(norms.mean()) == pytest.approx(task.input_sq_norm, rel=0.08)
    xs, ys = task.sample(7, torch.Generator(device=DEVICE).manual_seed(1))
    assert xs.shape == (7, 3) and ys.shape == (7, 2)
    assert math.isfinite(float(ys.sum()))


def test_dataset_pack_resumes_from_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    """A restarted pack gets its arrays again (not from the checkpoint, which holds only the spec)."""
    x, y = planted(6)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    o = Options(str(tmp_path / "d.npz"), seed=2)
    prep = prepare(o)
    spec = dataset_spec(o, prep.sizes, prep.content_hash)
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, finite_set=True, steps=12, batch_size=8, eval_every=4)
    nets = [NetworkSpec(net_id=i, width=w, seed=i, lr=0.1) for i, w in enumerate((3, 9))]
    whole = Pack(spec, ModelSpec(), dyn, nets, data_seed=1, dtype=F64, data=prep.arrays)
    half = Pack(spec, ModelSpec(), dyn, nets, data_seed=1, dtype=F64, data=prep.arrays)
    for _ in range(6):
        whole.step_once()
        half.step_once()
    half.save(tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="not shipped"):
        Pack.load(tmp_path / "ck.pt").task.train_set()
    resumed = Pack.load(tmp_path / "ck.pt", data=prep.arrays)
    for _ in range(6):
        whole.step_once()
        resumed.step_once()
    for sp in nets:
        for a, b in zip(whole.particles(sp.net_id), resumed.particles(sp.net_id), strict=True):
            if a is not None:
                assert torch.equal(a, b)
