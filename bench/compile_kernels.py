"""Build every variant of the fused engine kernels for a GPU architecture, without a GPU.

    python bench/compile_kernels.py                # sm_90 (H100/H200), every unit x bias x k x dtype/precision
    python bench/compile_kernels.py --arch 80 --quick

Runs Triton's whole compiler (frontend, TTGIR, LLVM, PTX, the bundled ptxas) and reads each cubin's register,
spill and shared-memory use with the bundled cuobjdump: a kernel that would not build on the GPU fails here.
Slow on a small CPU (seconds per variant). The last line printed is one JSON object: built, failed, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # real compilation, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from workers.engine.kernels import fused


def resources(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln.strip() for ln in out.splitlines() if "REG:" in ln), "")
    return " ".join(w for w in line.split() if w.split(":")[0] in ("REG", "STACK", "SHARED", "LOCAL"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90 = Hopper)")
    ap.add_argument("--quick", action="store_true", help="d <= 16 only, vector outputs for relu only")
    args = ap.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    built, failed = 0, 0
    t0 = time.perf_counter()
    for unit, code in fused.UNIT_CODES.items():
        for bias in (True, False) if unit != "gaussian" else (False,):
            for k in (1, 3):
                for dt, prec in (("fp32", "ieee"), ("fp32", "tf32"), ("fp64", "ieee")):
                    for d in (16, 64):
                        if args.quick and (d > 16 or (k > 1 and unit != "relu")):
                            continue
                        tiles = fused.choose_tiles(8, 4096, 2048, d, k, sm_count=132)
                        consts = {"UNIT": code, "HAS_BIAS": bias, "SCALAR_OUT": k == 1, "BLOCK_D": d,
                                  "BLOCK_K": 1 if k == 1 else 16, "PRECISION": prec}
                        for kern, bp, bn, warps in (
                            (fused._forward_kernel, tiles.fwd_p, tiles.fwd_n, tiles.fwd_warps),
                            (fused._backward_kernel, tiles.bwd_p, tiles.bwd_n, tiles.bwd_warps),
                        ):
                            c = {**consts, "BLOCK_P": bp, "BLOCK_N": bn}
                            sig = {a: "constexpr" if a in c else f"*{dt}" if a.endswith("_ptr") else "i32"
                                   for a in kern.arg_names}
                            what = f"{kern.__name__} {unit} bias={bias} k={k} {dt}/{prec} d<={d} {bp}x{bn}/{warps}w"
                            try:
                                ck = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=c), target=target,
                                                    options={"num_warps": warps})
                            except Exception as exc:
                                failed += 1
                                print(f"FAILED {what}: {type(exc).__name__}: {str(exc)[:300]}")
                                continue
                            built += 1
                            print(f"{what}: {resources(ck.asm['cubin'])}")
    print(json.dumps({"arch": args.arch, "triton": triton.__version__, "built": built, "failed": failed,
                      "seconds": round(time.perf_counter() - t0, 1)}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
