"""Checkpoint cost against run length: size and save/restore time after R reports.

    python bench/checkpoint.py                   # R = 10, 100, 1000 reports; 16 networks of width 64, d 16
    python bench/checkpoint.py --reports 10 100 1000 10000 --networks 64

For each R a pack reports R times (eval_every=1), then:
  - ``ckpt_bytes``/``save_ms``/``load_ms``: ``Pack.save`` and ``Pack.load`` of that pack (best of 5);
  - ``resume_ms``: a fresh :class:`workers.runner.PackRunner` handed the same job, from its start until it
    yields the first report past the checkpoint (what a restarted worker pays before it does new work);
  - ``log_bytes``: the report log beside the checkpoint (``<checkpoint>.reports.jsonl``), when there is one:
    it grows with R, but only by appends, and nothing reads it on a worker's restart.
A checkpoint that holds state only is flat in R; one that holds the report history grows with R (and a run
that checkpoints every C reports then writes O(R^2 / C) bytes in all).

Needs torch (and this repository on the path). The last line printed is one JSON object: {"reports": [...],
"ckpt_bytes": [...], "save_ms": [...], "load_ms": [...], "resume_ms": [...], "log_bytes": [...],
"ckpt_growth": bytes at the largest R over bytes at the smallest}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import DynamicsSpec, ModelSpec, NetworkSpec, Pack, TaskKind, TaskSpec
from workers.jobs import PackJob
from workers.runner import PackRunner


def make_job(reports: int, networks: int, width: int, checkpoint: Path) -> PackJob:
    # Reports at steps 0..R-1 (the pack checkpoints after its R-th report, then trains on). Each network's
    # stopping window is state too, bounded by stop_window / eval_every reports: kept short here, so that R
    # alone varies (with the default 1000-step window and eval_every=1 it fills up at R = 2000).
    dyn = DynamicsSpec(steps=reports + 10, batch_size=32, eval_every=1, stop_window=20)
    nets = tuple(NetworkSpec(i, width, seed=i, lr=0.05) for i in range(networks))
    return PackJob(pack_id="bench", task=TaskSpec(kind=TaskKind.TEACHER, dim=16, n_test=256), model=ModelSpec(),
                   dynamics=dyn, networks=nets, data_seed=0, checkpoint=str(checkpoint), checkpoint_every=reports - 1)


def best_ms(fn: object, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def measure(reports: int, networks: int, width: int, root: Path) -> dict[str, float]:
    ck = root / f"r{reports}" / "pack.pt"
    job = make_job(reports, networks, width, ck)
    runner = PackRunner("cpu", threads=1)
    gen = runner.train(job)
    for _ in range(reports):  # the R-th report is the first at or past checkpoint_every: saved before it left
        next(gen)
    gen.close()  # the worker dies here
    size = ck.stat().st_size
    pack = Pack.load(ck)
    save_ms = best_ms(lambda: pack.save(root / "copy.pt"))
    load_ms = best_ms(lambda: Pack.load(ck))
    saved_step = pack.step

    def resume() -> None:
        for ev in PackRunner("cpu", threads=1).train(job):
            if ev.report.step > saved_step:
                break

    resume_ms = best_ms(resume, repeat=3)
    logs = list(ck.parent.glob("*.jsonl"))
    return {"ckpt_bytes": size, "save_ms": save_ms, "load_ms": load_ms, "resume_ms": resume_ms,
            "log_bytes": sum(p.stat().st_size for p in logs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--networks", type=int, default=16)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()
    if min(args.reports) < 3:
        sys.exit("--reports: each value must be >= 3")
    torch.set_num_threads(1)
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.reports:
            row = measure(r, args.networks, args.width, Path(tmp))
            print(f"R={r:>6}: checkpoint {row['ckpt_bytes']:>10,} B  save {row['save_ms']:7.2f} ms  "
                  f"load {row['load_ms']:7.2f} ms  worker resume {row['resume_ms']:8.2f} ms  "
                  f"report log {row['log_bytes']:>10,} B", flush=True)
            for k, v in row.items():
                rows.setdefault(k, []).append(round(v, 3))
    growth = rows["ckpt_bytes"][-1] / rows["ckpt_bytes"][0]
    print(json.dumps({"reports": args.reports, **rows, "ckpt_growth": round(growth, 3)}))


if __name__ == "__main__":
    main()
