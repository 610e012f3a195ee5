"""mfsweep vs the way a Ray Tune user runs the same width sweep.

    python bench/peer.py            # 8 widths 16..2048 x 4 seeds, d 16, batch 256, 300 online-SGD steps

(a) Ray Tune: one trial per network (function trainable: nn.Module + torch.optim.SGD, lr = n dt), reporting
    the test loss every 50 steps, MLflowLoggerCallback into a fresh SQLite store;
(b) `mfsweep scaling` on the same sweep (local Ray, SQLite MLflow, packing, checkpoints, fit and plots).
Both start their own Ray; both use the same teacher, initial particles and batch stream, so their final
losses by width agree. Prints one JSON line last: ray_tune_s, mfsweep_s, speedup, loss tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTHS = [16, 32, 64, 128, 256, 512, 1024, 2048]


def tune_trainable(config: dict) -> None:
    """What a Ray Tune user writes: one network per trial."""
    from ray import tune

    from workers.engine import (
        DataStream,
        DynamicsSpec,
        ModelSpec,
        TaskKind,
        TaskSpec,
        init_particles,
        make_task,
    )
    from workers.engine.rng import NETWORK_STREAM, derive_seed, generator

    torch.set_num_threads(1)
    task = make_task(TaskSpec(kind=TaskKind.TEACHER, dim=config["dim"], n_test=config["n_test"]))
    dyn = DynamicsSpec(steps=config["steps"], batch_size=config["batch"])
    w, b, c = init_particles(task, ModelSpec(), config["width"],
                             generator(derive_seed(config["seed"], NETWORK_STREAM)))
    params = [torch.nn.Parameter(t.clone()) for t in (w, b, c)]  # type: ignore[union-attr]
    n = config["width"]

    def net(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ params[0].T + params[1]) @ params[2] / n

    opt = torch.optim.SGD(params, lr=config["lr"] * n)
    data = DataStream(task, dyn, 0, exact=False)
    xt, yt = task.test_set()
    for step in range(1, dyn.steps + 1):
        x, y = data.next()  # type: ignore[misc]
        loss = 0.5 * (net(x) - y).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == dyn.steps:
            with torch.no_grad():
                test = float(0.5 * (net(xt) - yt).square().sum(1).mean())
            tune.report({"test_loss": test, "step": step})


def run_tune(args: argparse.Namespace, root: Path) -> tuple[float, dict[int, float]]:
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from workers.engine import derive_seed

    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    space = {"width": tune.grid_search(WIDTHS[: args.n_widths]),
             "seed": tune.grid_search([derive_seed(0, r) for r in range(args.seeds)]),
             "dim": args.dim, "batch": args.batch, "steps": args.steps, "lr": args.lr, "n_test": args.n_test}
    tuner = tune.Tuner(
        tune_trainable, param_space=space,
        tune_config=tune.TuneConfig(metric="test_loss", mode="min"),
        run_config=tune.RunConfig(
            storage_path=str(root / "tune"), verbose=0,
            callbacks=[MLflowLoggerCallback(tracking_uri=f"sqlite:///{root / 'tune_mlflow.db'}",
                                            experiment_name="peer", save_artifact=False)]),
    )
    results = tuner.fit()
    elapsed = time.perf_counter() - t0
    ray.shutdown()
    losses: dict[int, list[float]] = {}
    for r in results:
        losses.setdefault(r.config["width"], []).append(r.metrics["test_loss"])
    return elapsed, {w: sum(v) / len(v) for w, v in sorted(losses.items())}


def run_mfsweep(args: argparse.Namespace, root: Path) -> tuple[float, dict[int, float]]:
    from orchestrator import config as cfgmod
    from orchestrator.scaling import ScalingSweep

    t0 = time.perf_counter()
    cfg = cfgmod.load(None, [
        f"sweep.widths={WIDTHS[: args.n_widths]}", f"sweep.seeds={args.seeds}", f"task.dim={args.dim}",
        f"dynamics.batch_size={args.batch}", f"dynamics.steps={args.steps}", f"dynamics.lr={args.lr}",
        "dynamics.eval_every=50", f"task.n_test={args.n_test}"])
    summary = ScalingSweep(cfg, root / "mfsweep", progress=False).run()
    elapsed = time.perf_counter() - t0
    losses: dict[int, list[float]] = {}
    for p in summary["variants"][0]["points"]:
        losses.setdefault(p["width"], []).append(p["last_test_loss"])  # the last point, as Tune reports
    return elapsed, {w: sum(v) / len(v) for w, v in sorted(losses.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-widths", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--n-test", type=int, default=4096)
    ap.add_argument("--skip-tune", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mf_s, mf = run_mfsweep(args, root)
        tune_s, tn = (float("nan"), {}) if args.skip_tune else run_tune(args, root)
    print(f"{'width':>6} {'mfsweep':>10} {'ray_tune':>10}")
    for w in mf:
        print(f"{w:>6} {mf[w]:>10.5g} {tn.get(w, float('nan')):>10.5g}")
    rel = max((abs(mf[w] - tn[w]) / tn[w] for w in tn), default=None)
    print(json.dumps({"ray_tune_s": round(tune_s, 2), "mfsweep_s": round(mf_s, 2),
                      "speedup": round(tune_s / mf_s, 2), "max_rel_diff": rel,
                      "mfsweep_loss_by_width": mf, "ray_tune_loss_by_width": tn}))


if __name__ == "__main__":
    main()
