"""The Ray pool's own overheads at many actors: a real multi-node Ray cluster on this machine.

    python bench/actors.py [--actors 32] [--nodes 4] [--packs 128] [--steps 2000] [--eval-every 20]
                           [--checkpoint-every 200]

Starts ``ray.cluster_utils.Cluster`` (a head that takes no actors and ``--nodes`` worker nodes sharing
``--actors`` CPU slots), opens the real pool on it (``RayPool``: one actor per slot) and trains ``--packs``
packs of one tiny network each (width 16, a 4-d teacher, 32-sample batches: training is negligible, so the
figures are the pool's: actor start-up, report streams, checkpoint writes). The same sweep runs first on 2
actors, then on ``--actors``, side by side. Per run: seconds until every actor answered, wall time of the
sweep, reports received per second, the driver process's CPU time per report (the report stream's cost in
the driver, Ray's client threads included), checkpoint writes (each pack writes one every
``--checkpoint-every`` steps, plus its report log) and their bytes. Prints one JSON line last. On a 2-core
machine 32 actors share 2 cores: wall times measure contention, the per-report driver cost is the figure that
must not grow with the actor count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raycluster import cluster_with_pool  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def run(actors: int, args: argparse.Namespace, work: Path) -> dict[str, object]:
    from orchestrator import config as cfgmod
    from orchestrator.plan import plan_networks, plan_packs
    from workers.jobs import PackEvent

    seeds = args.packs
    cfg = cfgmod.load(ROOT / "configs" / "scaling" / "teacher_relu.yaml", [
        "sweep.variants=[]", "sweep.widths=[16]", f"sweep.seeds={seeds}", "task.dim=4", "task.n_test=256",
        f"dynamics.steps={args.steps}", f"dynamics.eval_every={args.eval_every}", "dynamics.batch_size=32",
        f"execution.checkpoint_every={args.checkpoint_every}", "execution.max_networks_per_pack=1",
        "execution.device=cpu"])
    nodes = min(args.nodes, actors)
    with cluster_with_pool([actors // nodes + (1 if i < actors % nodes else 0) for i in range(nodes)],
                           max_retries=0) as (_, pool, ready_s):
        ckdir = work / f"a{actors}"
        jobs = plan_packs(cfg, plan_networks(cfg), n_workers=pool.plan_workers, memory_bytes=pool.memory_bytes,
                          checkpoint_dir=ckdir)
        reports = [0]

        def on_event(ev: PackEvent) -> None:
            reports[0] += 1

        cpu0, t1 = time.process_time(), time.perf_counter()
        failures = pool.run(jobs, on_event)
        wall = time.perf_counter() - t1
        cpu = time.process_time() - cpu0
        assert not failures, failures
        files = [p for p in ckdir.rglob("*") if p.is_file()]
        logs = [p for p in files if p.name.endswith(".reports.jsonl")]
        expected = len(jobs) * (1 + args.steps // args.eval_every)
        assert reports[0] == expected, (reports[0], expected)
        return {"actors": pool.n_workers, "nodes": nodes, "actors_ready_s": round(ready_s, 2),
                "packs": len(jobs), "wall_s": round(wall, 2), "reports": reports[0],
                "reports_per_s": round(reports[0] / wall, 1),
                "driver_cpu_ms_per_report": round(1e3 * cpu / reports[0], 3),
                "checkpoint_writes": len(jobs) * (args.steps // args.checkpoint_every),
                "checkpoint_bytes": sum(p.stat().st_size for p in files if p not in logs),
                "report_log_bytes": sum(p.stat().st_size for p in logs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, default=32)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--packs", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--checkpoint-every", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = {}
    with tempfile.TemporaryDirectory(prefix="mfsweep-bench-actors-") as tmp:
        for n in (2, args.actors):
            out[n] = run(n, args, Path(tmp))
            print(f"{n} actors: {out[n]}", flush=True)
    small, big = out[2], out[args.actors]
    print(json.dumps({"bench": "actors", "small": small, "large": big,
                      "driver_cpu_per_report_ratio": round(float(big["driver_cpu_ms_per_report"])  # type: ignore[arg-type]
                                                           / float(small["driver_cpu_ms_per_report"]), 2),  # type: ignore[arg-type]
                      "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
