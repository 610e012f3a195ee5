"""An elastic pool on a growing cluster vs the same sweep on a fixed one.

    python bench/elastic.py             # 16 networks (widths 16..128 x 4 seeds), 1 per pack, 12000 steps

Both runs use a real Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head that takes no actors
and 1-CPU worker nodes) and the same packs, planned when the pool starts with one worker node:
(a) fixed: one worker node throughout;
(b) growing: one worker node, two more added when 20% of the sweep's particle-steps are done; the pool
    starts actors on them and they take packs from the queue.
Prints one JSON line last: wall times, speedup, and the share of packs the new nodes ran. On a machine with
fewer free cores than nodes the speedup is bounded by the cores, not by the pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raycluster import cluster_with_pool  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]


def run(grow: bool, args: argparse.Namespace, work: Path) -> dict:
    from orchestrator import config as cfgmod
    from orchestrator.plan import plan_networks, plan_packs
    from workers.jobs import PackEvent

    cfg = cfgmod.load(ROOT / "configs" / "scaling" / "teacher_relu.yaml", [
        "sweep.variants=[]", f"sweep.widths={args.widths}", f"sweep.seeds={args.seeds}",
        f"dynamics.steps={args.steps}", "dynamics.eval_every=100", "dynamics.batch_size=64", "task.n_test=256",
        "execution.checkpoint_every=500", "execution.max_networks_per_pack=1", "execution.device=cpu"])
    with cluster_with_pool([1], max_retries=0) as (cluster, pool, _):
        first_node = pool.workers[0].node
        nets = plan_networks(cfg)
        jobs = plan_packs(cfg, nets, n_workers=pool.plan_workers, memory_bytes=pool.memory_bytes,
                          checkpoint_dir=work / ("grow" if grow else "fixed"))
        total = sum(j.cost for j in jobs)
        width = {sp.net_id: sp.width for j in jobs for sp in j.networks}
        done = [0.0]
        last: dict[int, int] = {}
        node_of: dict[str, str] = {}
        fifth = threading.Event()

        def on_event(ev: PackEvent) -> None:
            node_of.setdefault(ev.pack_id, pool.worker_nodes[ev.worker])
            for m in ev.report.metrics:
                done[0] += width[m.net_id] * (m.step - last.get(m.net_id, 0))
                last[m.net_id] = m.step
            if done[0] >= 0.2 * total:
                fifth.set()

        # The pool runs in a thread while this (main) thread adds nodes, as an autoscaler would: Ray's
        # test cluster starts nodes from the main thread only.
        result: list = []
        t0 = time.perf_counter()
        runner = threading.Thread(target=lambda: result.append(pool.run(jobs, on_event)), daemon=True)
        runner.start()
        grew_at = None
        if grow:
            fifth.wait()
            grew_at = time.perf_counter() - t0
            for _ in range(2):
                cluster.add_node(num_cpus=1)
        runner.join()
        wall = time.perf_counter() - t0
        assert result == [[]], result
        new = sum(1 for nd in node_of.values() if nd != first_node)
        return {"wall_s": round(wall, 2), "packs": len(jobs), "packs_on_new_nodes": new,
                "share_on_new_nodes": round(new / len(jobs), 3),
                "grew_at_s": round(grew_at, 2) if grew_at else None, "workers_at_end": pool.n_workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="[16,32,64,128]")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12000)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="mfsweep-bench-elastic-") as tmp:
        fixed = run(False, args, Path(tmp))
        print(f"fixed 1 node: {fixed}", flush=True)
        grown = run(True, args, Path(tmp))
        print(f"growing 1 -> 3 nodes at 20%: {grown}", flush=True)
    print(json.dumps({"benchmark": "elastic", "fixed_wall_s": fixed["wall_s"], "growing_wall_s": grown["wall_s"],
                      "speedup": round(fixed["wall_s"] / grown["wall_s"], 2), "packs": fixed["packs"],
                      "share_packs_on_new_nodes": grown["share_on_new_nodes"], "grew_at_s": grown["grew_at_s"],
                      "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
