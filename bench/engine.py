"""Packed engine vs one-network-after-another loop, on one width-scaling sweep shape.

    python bench/engine.py --device cpu            # widths 16..2048 x 4 seeds, d 16, batch 256, 300 steps
    python bench/engine.py --device cuda           # widths 16..16384 x 8 seeds, d 16, batch 2048, 200 steps
    python bench/engine.py --device cuda --kernel torch     # the packed engine without the fused kernels

Needs torch alone (and triton for --kernel triton; plus this repository on the path). The last line printed
is one JSON object: loop_s, packed_s, speedup, useful_tflops (6 P N d per step over packed time),
fp32_peak_tflops (a large FP32 matmul, TF32 off, timed on the same device in the same run), pct_fp32_peak
(useful over that peak, in percent), kernel (what the packed engine ran), peak_mem_bytes (CUDA: the packed
run's max allocated; CPU: the engine's own estimate), max_rel_diff (final test loss by width, packed vs
loop, seed-averaged).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.engine import (
    DataStream,
    DynamicsSpec,
    ModelSpec,
    NetworkSpec,
    Pack,
    TaskKind,
    TaskSpec,
    estimate_pack_bytes,
    init_particles,
    make_task,
)
from workers.engine.rng import NETWORK_STREAM, derive_seed, generator


class MeanFieldNet(torch.nn.Module):
    """What a user would write: f(x) = (1/n) sum_i c_i relu(w_i . x + b_i)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.b = torch.nn.Parameter(b.clone())
        self.c = torch.nn.Parameter(c.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w.T + self.b) @ self.c / self.w.shape[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_loop(task_spec: TaskSpec, model: ModelSpec, dyn: DynamicsSpec, nets: list[NetworkSpec],
             device: torch.device) -> tuple[float, dict[int, float]]:
    """One network after another, nn.Module + torch.optim.SGD (lr = n dt), the same init and batches."""
    task = make_task(task_spec, device)
    xt, yt = task.test_set()
    losses: dict[int, float] = {}
    sync(device)
    t0 = time.perf_counter()
    for sp in nets:
        gen = generator(derive_seed(sp.seed, NETWORK_STREAM), device)
        w, b, c = init_particles(task, model, sp.width, gen)
        assert b is not None
        net = MeanFieldNet(w, b, c)
        opt = torch.optim.SGD(net.parameters(), lr=sp.lr * sp.width)
        data = DataStream(task, dyn, 0, exact=False)
        for _ in range(dyn.steps):
            batch = data.next()
            assert batch is not None
            x, y = batch
            loss = 0.5 * (net(x) - y).square().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[sp.net_id] = float(0.5 * (net(xt) - yt).square().sum(1).mean())
    sync(device)
    return time.perf_counter() - t0, losses


def run_packed(task_spec: TaskSpec, model: ModelSpec, dyn: DynamicsSpec, nets: list[NetworkSpec],
               device: torch.device, kernel: str = "auto", precision: str = "ieee"
               ) -> tuple[float, dict[int, float], str]:
    sync(device)
    t0 = time.perf_counter()
    pack = Pack(task_spec, model, dyn, nets, device=device, kernel=kernel, precision=precision)
    final: dict[int, float] = {}
    for rep in pack.train():
        for r in rep.retired:
            if r.final_test_loss is not None:
                final[r.net_id] = r.final_test_loss
    sync(device)
    return time.perf_counter() - t0, final, pack.kernel


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def fp32_peak_tflops(device: torch.device) -> float:
    """FP32 matmul throughput of this device now (TF32 off): the best of a few square GEMMs."""
    size = 8192 if device.type == "cuda" else 1024
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(size, size, device=device)
        b = torch.randn(size, size, device=device)
        torch.mm(a, b)
        best = math.inf
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    return 2.0 * size**3 / best / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-width", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--skip-loop", action="store_true", help="time the packed engine only")
    ap.add_argument("--kernel", default="auto", choices=["auto", "torch", "triton"],
                    help="the packed engine's sampled-loss steps (auto: triton on CUDA when importable)")
    ap.add_argument("--precision", default="ieee", choices=["ieee", "tf32"], help="triton float32 dots")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    max_w = args.max_width or (16384 if gpu else 2048)
    seeds = args.seeds or (8 if gpu else 4)
    batch = args.batch or (2048 if gpu else 256)
    steps = args.steps or (200 if gpu else 300)
    widths = [16 * 2**i for i in range(20) if 16 * 2**i <= max_w]
    task = TaskSpec(kind=TaskKind.TEACHER, dim=args.dim, n_test=2048)
    model = ModelSpec()
    dyn = DynamicsSpec(steps=steps, batch_size=batch, eval_every=steps)
    nets = [NetworkSpec(net_id=i, width=w, seed=s, lr=args.lr)
            for i, (w, s) in enumerate((w, s) for w in widths for s in range(seeds))]

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    # Warm-up (allocator, kernel compilation) on a short run of every network (the Triton kernels are built
    # per shape class) so neither side pays first-call costs.
    warm = DynamicsSpec(steps=3, batch_size=batch, eval_every=3)
    run_packed(task, model, warm, nets, device, args.kernel, args.precision)
    run_loop(task, model, warm, nets[:2], device)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    packed_s, packed, kernel = run_packed(task, model, dyn, nets, device, args.kernel, args.precision)
    peak = (torch.cuda.max_memory_allocated() if gpu
            else estimate_pack_bytes([sp.width for sp in nets], batch=batch, dim=args.dim))
    loop_s, loop = (float("nan"), {}) if args.skip_loop else run_loop(task, model, dyn, nets, device)
    peak_tflops = fp32_peak_tflops(device)

    n_total = sum(sp.width for sp in nets)
    flops = 6.0 * batch * n_total * args.dim * steps
    by_width = {}
    max_rel = 0.0
    for w in widths:
        ids = [sp.net_id for sp in nets if sp.width == w]
        p = sum(packed[i] for i in ids) / len(ids)
        row = {"packed": p}
        if loop:
            q = sum(loop[i] for i in ids) / len(ids)
            row["loop"] = q
            max_rel = max(max_rel, abs(p - q) / abs(q))
        by_width[w] = row
    print(f"{'width':>7} {'packed':>12} {'loop':>12}")
    for w, row in by_width.items():
        print(f"{w:>7} {row['packed']:>12.5g} {row.get('loop', float('nan')):>12.5g}")
    out = {
        "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__, "triton": triton_version(),
        "widths": widths, "seeds": seeds, "dim": args.dim, "batch": batch, "steps": steps,
        "loop_s": round(loop_s, 4), "packed_s": round(packed_s, 4),
        "speedup": round(loop_s / packed_s, 3),
        "useful_tflops": round(flops / packed_s / 1e12, 5),
        "fp32_peak_tflops": round(peak_tflops, 4),
        "pct_fp32_peak": round(100.0 * flops / packed_s / 1e12 / peak_tflops, 3),
        "kernel": kernel, "precision": args.precision if kernel == "triton" else None,
        "peak_mem_bytes": int(peak),
        "max_rel_diff": max_rel if loop else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
