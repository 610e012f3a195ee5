"""A 64-trial Optuna search on the teacher task, two ways, on the same space, sampler and seed, and budget:

(a) what Optuna users do today: ``study.optimize`` with one trial at a time in the driver process, each trial
    training a ``torch.nn.Module`` with ``torch.optim.SGD`` (mean-field scaling, the same initial particles
    and batches as the engine, birth-death written in plain torch), no pruning unless --baseline-pruner;
(b) ``mfsweep search`` as a user runs it (a subprocess of the real CLI: starting a local Ray, packing,
    pruning, MLflow, plots), on configs/search/bd_teacher.yaml with 64 trials and no width fidelity.

    python bench/search.py                         # 3000 steps a trial, sampler seeds 0-4 (about 12 min)
    python bench/search.py --steps 600 --seeds 0   # the config's own budget: fixed costs dominate
    python bench/search.py --mfsweep-set search.reeval.top_k=4 --mfsweep-set search.reeval.seeds=4

Why 3000 steps: at 600 steps a trial costs study.optimize 0.3 s, less than mfsweep spends starting Python,
Ray and MLflow; real searches train longer (the paper's student-teacher example runs 1e5 steps). Why several seeds and a
re-evaluation: at a fixed SGD budget the final test loss of one run is a draw from the noise floor, so the
best of 64 runs is mostly luck (the same search, run twice on Ray, picks different winners). Each search's
pick is therefore also retrained on --reeval fresh seeds (paired, outside the timed part): that mean is its
real quality.

The last line printed is one JSON object: wall seconds of each (summed over seeds), speedup, particle-steps,
per seed the best single-run value and the re-evaluated quality of each pick, and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import MeanFieldNet  # noqa: E402  (the same user-style network as the engine benchmark)
from orchestrator.search import make_sampler, network_spec, suggest  # noqa: E402
from orchestrator.search_config import SearchConfig, load_search  # noqa: E402
from workers.engine import DataStream, Pack, derive_seed, generator, init_particles, make_task  # noqa: E402
from workers.engine.rng import NETWORK_STREAM  # noqa: E402

CONFIG = ROOT / "configs" / "search" / "bd_teacher.yaml"


@torch.no_grad()
def birth_death_(net: MeanFieldNet, potential: torch.Tensor, alpha: float, dt: float, prior: bool,
                 draw: Any, gen: torch.Generator) -> None:
    """Plain-torch birth-death step (docs/science.md section 4, per-time rate): above-average potential dies,
    below-average clones; kills are refilled by copies of uniform particles (clone) or prior draws (prior),
    clones overwrite uniform particles, so n stays fixed."""
    n = potential.shape[0]
    beta = potential - potential.mean()
    p = -torch.expm1(-alpha * beta.abs() * dt)
    event = torch.rand(n, generator=gen) < p
    kill = (event & (beta > 0)).nonzero().squeeze(1)
    clone = (event & (beta < 0)).nonzero().squeeze(1)
    src = torch.arange(n)
    if clone.numel():
        src[torch.randint(0, n, (clone.numel(),), generator=gen)] = clone
    if kill.numel() and not prior:
        src[kill] = torch.randint(0, n, (kill.numel(),), generator=gen)
    for prm in (net.w, net.b, net.c):
        prm.copy_(prm[src])
    if kill.numel() and prior:
        w, b, _ = draw(kill.numel())
        net.w[kill], net.b[kill], net.c[kill] = w, b, 0.0


def baseline(cfg: SearchConfig, trials: int, pruner: str) -> dict[str, Any]:
    """(a): study.optimize, one trial at a time, nn.Module + torch.optim in this process."""
    base, _ = cfg.resolve({})
    task = make_task(base.task.spec())
    model = base.model.spec()
    xt, yt = task.test_set()
    particle_steps = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal particle_steps
        params = suggest(trial, cfg.search.space)
        tcfg, n = cfg.resolve(params)
        dyn = tcfg.dynamics
        gen = generator(derive_seed(derive_seed(cfg.search.seed, 0), NETWORK_STREAM))
        w, b, c = init_particles(task, model, n, gen)
        assert b is not None
        net = MeanFieldNet(w, b, c)
        opt = torch.optim.SGD(net.parameters(), lr=dyn.lr * n)  # mean-field: raw lr = n dt
        data = DataStream(task, tcfg.dynamics.spec(), cfg.search.seed, exact=False)
        bd = dyn.birth_death

        def draw(k: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
            return init_particles(task, model, k, gen, prior=True)

        for step in range(1, dyn.steps + 1):
            batch = data.next()
            assert batch is not None
            x, y = batch
            loss = 0.5 * (net(x) - y).square().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            assert net.c.grad is not None
            potential = (net.c * net.c.grad).sum(1) * n  # V_i = c_i E[(f_n - f) phi_i], before the step
            opt.step()
            if bd.rate > 0 and step <= dyn.steps - bd.quench:
                birth_death_(net, potential, bd.rate, dyn.lr, bd.scheme.value == "prior", draw, gen)
            particle_steps += n
            if step % dyn.eval_every == 0 or step == dyn.steps:
                with torch.no_grad():
                    test = float(0.5 * (net(xt) - yt).square().sum(1).mean())
                if not math.isfinite(test) or test > dyn.diverge_threshold:
                    return float("nan")  # Optuna fails the trial
                trial.report(test, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return test

    pr: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if pruner == "successive_halving":
        from orchestrator.search import make_pruner

        pr = make_pruner(cfg)
    study = optuna.create_study(sampler=make_sampler(cfg, 0), pruner=pr)
    t0 = time.perf_counter()
    study.optimize(objective, n_trials=trials)
    wall = time.perf_counter() - t0
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(done, key=lambda t: t.values[0])
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return {"wall_s": wall, "particle_steps": particle_steps, "best": best.values[0],
            "best_params": best.params, "states": states}


def mfsweep(sets: list[str], backend: str) -> dict[str, Any]:
    """(b): the real CLI in a subprocess (startup, Ray, MLflow and plots included in the wall time)."""
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "orchestrator.cli", "search", str(CONFIG), "--out", str(out),
               "--no-progress", "--backend", backend]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"mfsweep search failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "particle_steps": summary["particle_steps"], "best": summary["best"]["value"],
            "best_params": summary["best"]["params"], "states": summary["states"]}


def reevaluate(cfg: SearchConfig, params: list[dict[str, Any]], reps: int) -> list[list[float]]:
    """Final test loss of each parameter set on ``reps`` fresh seeds, none of them the search's (seed 0):
    the true quality of a search's pick, free of the luck that made its one run the best. Paired: replicate
    r trains every parameter set from the same initial particles on the same batches."""
    resolved = [cfg.resolve(p) for p in params]
    base = resolved[0][0]
    out: list[list[float]] = [[] for _ in params]
    for r in range(reps):
        nets = [network_spec(tcfg, i, width, 1000 + r) for i, (tcfg, width) in enumerate(resolved)]
        pack = Pack(base.task.spec(), base.model.spec(), base.dynamics.spec(), nets, data_seed=1000 + r)
        for rep in pack.train():
            for ret in rep.retired:
                out[ret.net_id].append(float("nan") if ret.final_test_loss is None else ret.final_test_loss)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3000, help="dynamics.steps (the budget of a trial)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                    help="sampler seeds: one search of each kind per seed (the best value of one search is "
                         "a noisy draw; compare several)")
    ap.add_argument("--parallel", type=int, default=16, help="mfsweep: trials in flight at once")
    ap.add_argument("--mfsweep-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra --set for (b) only, e.g. search.reeval.top_k=4 (repeatable)")
    ap.add_argument("--reeval", type=int, default=16,
                    help="fresh seeds on which both searches' picks are re-trained (0: skip)")
    ap.add_argument("--backend", default="ray", choices=["ray", "local"], help="mfsweep pool")
    ap.add_argument("--baseline-pruner", default="none", choices=["none", "successive_halving"],
                    help="give (a) the same pruner as (b)")
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        sets = [f"search.trials={args.trials}", "search.fidelity=null", f"search.parallel={args.parallel}",
                f"search.sampler.seed={seed}"]
        if args.steps:
            sets.append(f"dynamics.steps={args.steps}")
        cfg = load_search(CONFIG, sets)
        b = mfsweep(sets + args.mfsweep_set, args.backend)
        print(f"seed {seed} (b) mfsweep search: {b['wall_s']:.1f} s, best {b['best']:.4g}, {b['states']}",
              flush=True)
        a = baseline(cfg, args.trials, args.baseline_pruner)
        print(f"seed {seed} (a) study.optimize + nn.Module: {a['wall_s']:.1f} s, best {a['best']:.4g}, "
              f"{a['states']}", flush=True)
        row_q: dict[str, Any] = {}
        if args.reeval:
            qa, qb = reevaluate(cfg, [a["best_params"], b["best_params"]], args.reeval)
            row_q = {"optimize_pick_reeval": statistics.fmean(qa), "mfsweep_pick_reeval": statistics.fmean(qb),
                     "reeval_paired_diff_se": statistics.stdev([y - x for x, y in zip(qa, qb, strict=True)])
                     / math.sqrt(len(qa)) if len(qa) > 1 else None}
            print(f"seed {seed} picks re-trained on {args.reeval} fresh seeds: optimize "
                  f"{row_q['optimize_pick_reeval']:.4g}, mfsweep {row_q['mfsweep_pick_reeval']:.4g}", flush=True)
        rows.append({"seed": seed, "optimize_s": round(a["wall_s"], 2), "mfsweep_s": round(b["wall_s"], 2),
                     "speedup": round(a["wall_s"] / b["wall_s"], 2),
                     "optimize_particle_steps": a["particle_steps"], "mfsweep_particle_steps": b["particle_steps"],
                     "optimize_best": a["best"], "mfsweep_best": b["best"],
                     "optimize_states": a["states"], "mfsweep_states": b["states"],
                     "optimize_params": a["best_params"], "mfsweep_params": b["best_params"], **row_q})
    opt_s, mf_s = sum(r["optimize_s"] for r in rows), sum(r["mfsweep_s"] for r in rows)
    print(json.dumps({
        "trials": args.trials, "steps": cfg.dynamics.steps, "width": cfg.search.trial_width,
        "parallel": args.parallel, "backend": args.backend, "sampler": cfg.search.sampler.name,
        "seeds": args.seeds, "baseline_pruner": args.baseline_pruner, "mfsweep_set": args.mfsweep_set,
        "mfsweep_pruner": cfg.search.pruner_name,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "optimize_s": round(opt_s, 2), "mfsweep_s": round(mf_s, 2), "speedup": round(opt_s / mf_s, 2),
        "optimize_particle_steps": sum(r["optimize_particle_steps"] for r in rows),
        "mfsweep_particle_steps": sum(r["mfsweep_particle_steps"] for r in rows),
        "optimize_best_median": statistics.median(r["optimize_best"] for r in rows),
        "mfsweep_best_median": statistics.median(r["mfsweep_best"] for r in rows),
        "mfsweep_best_le_optimize": sum(r["mfsweep_best"] <= r["optimize_best"] for r in rows),
        **({"optimize_pick_reeval_mean": statistics.fmean(r["optimize_pick_reeval"] for r in rows),
            "mfsweep_pick_reeval_mean": statistics.fmean(r["mfsweep_pick_reeval"] for r in rows)}
           if args.reeval else {}),
        "per_seed": rows,
    }))


if __name__ == "__main__":
    main()
