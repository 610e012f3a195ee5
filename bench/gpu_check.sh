#!/usr/bin/env bash
# The prepared GPU check of the fused engine kernels; needs python3 with torch, triton and pytest only.
#
#   bench/gpu_check.sh [OUT_DIR]          # on a CUDA machine (OUT_DIR defaults to $OUT, else bench/results/gpu_check)
#   bench/gpu_check.sh --cpu [OUT_DIR]    # rehearsal on a CPU: the same steps at tiny shapes, Triton interpreted
#
# Steps: (1) workers.engine, its kernels and bench/engine.py import with ray/optuna/mlflow/pydantic blocked;
# (2) the engine's oracle tests on the device (tests/workers/test_kernels.py compares the Triton kernels with
# the torch path and the nn.Module loop; the packed-vs-loop, invariant and checkpoint tests run the default
# kernel, which is triton on CUDA); (3) bench/engine.py with --kernel torch and --kernel triton at the default
# shape and at --max-width 65536 --skip-loop. Each step's output goes to OUT_DIR/<step>.log and each benchmark's
# JSON line to OUT_DIR/<name>.json; summary.json collects them. Expected about 4-5 minutes on one H100/H200;
# every step has a timeout, all within one 450 s deadline, so the script ends in under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=cuda
if [[ "${1:-}" == "--cpu" ]]; then
  mode=cpu
  shift
fi
out="${1:-${OUT:-bench/results/gpu_check}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
status=0
deadline=$((SECONDS + 450))

step() {  # step NAME TIMEOUT_S CMD...: run, log, remember a failure, go on
  local name=$1 limit=$2
  shift 2
  local left=$((deadline - SECONDS))
  if ((left < 15)); then
    echo "--- $name: SKIPPED (the 450 s deadline is reached)"
    status=1
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "--- $name (timeout ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$out/$name.log"
  echo "--- $name: exit $rc in $((SECONDS - t0)) s"
  if [[ $rc -ne 0 ]]; then status=1; fi
  return $rc
}

bench() {  # bench NAME TIMEOUT_S ARGS...: bench/engine.py, its last line to NAME.json
  local name=$1
  shift
  local limit=$1
  shift
  if step "$name" "$limit" "$py" bench/engine.py "$@"; then
    tail -n 1 "$out/$name.log" >"$out/$name.json"
  fi
}

step imports 60 "$py" - <<'EOF'
import importlib.abc, runpy, sys

BLOCKED = {"ray", "optuna", "mlflow", "pydantic"}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be needed here")
        return None

sys.meta_path.insert(0, Block())
import workers.engine  # noqa: E402
import workers.engine.kernels.fused  # noqa: E402
runpy.run_path("bench/engine.py", run_name="not_main")
print("workers.engine, its kernels and bench/engine.py import without", sorted(BLOCKED))
EOF

if [[ $mode == cuda ]]; then
  export MFSWEEP_TEST_DEVICE=cuda
  step tests 200 "$py" -m pytest -q -p no:cacheprovider tests/workers/test_kernels.py \
    tests/workers/test_packed_vs_loop.py tests/workers/test_invariants.py tests/workers/test_checkpoint.py
  for k in torch triton; do bench "engine_default_$k" 100 --device cuda --kernel "$k"; done
  for k in torch triton; do bench "engine_w65536_$k" 60 --device cuda --kernel "$k" --max-width 65536 --skip-loop; done
else
  export TRITON_INTERPRET=1
  step tests 200 "$py" -m pytest -q -p no:cacheprovider tests/workers/test_kernels.py -k "autograd and relu-bias"
  tiny=(--device cpu --max-width 32 --seeds 2 --batch 32 --steps 3)
  for k in torch triton; do bench "engine_default_$k" 100 "${tiny[@]}" --kernel "$k"; done
  for k in torch triton; do bench "engine_w65536_$k" 60 "${tiny[@]}" --kernel "$k" --skip-loop; done
fi

"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("engine_*.json"))}
(out / "summary.json").write_text(json.dumps(runs, indent=1))
keys = ("kernel", "packed_s", "loop_s", "speedup", "useful_tflops", "pct_fp32_peak", "peak_mem_bytes", "max_rel_diff")
for name, r in runs.items():
    print(name, {k: r.get(k) for k in keys})
EOF
echo "--- gpu_check: $([[ $status -eq 0 ]] && echo all steps passed || echo SOME STEPS FAILED), results in $out"
exit $status
