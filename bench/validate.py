"""Benchmark: wall time of ``mfsweep validate CONFIG`` (a fresh process, as a user runs it) on every shipped
config, scaling and search; and of a rejected config (a typo), which must be as quick.

    python bench/validate.py [--repeat 5]

Prints one line per config (median seconds over the repeats), then one JSON object as the last line:
    configs             number of configs timed (plus the rejected one), function-task configs apart
    function_target_configs_s  configs whose validation imports the user's target function (and so torch)
    median_s, max_s     median and worst of the per-config medians
    rejected_s          median time of a config rejected for an unknown key
    python_startup_s    median time of `python -c pass` (the floor every command pays)
    target_s            1.0; under_target: max_s < target_s
Load on the machine shifts these figures: run `uptime` beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 1.0


def timed(argv: list[str], expect: int) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    dt = time.perf_counter() - t0
    if proc.returncode != expect:
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}, expected {expect}: {proc.stderr.strip()[-300:]}")
    return dt


def median_of(argv: list[str], repeat: int, expect: int = 0) -> float:
    return statistics.median(timed(argv, expect) for _ in range(repeat))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "orchestrator.cli", "validate"]
    wine = ROOT / "runs" / "data" / "wine.csv"  # configs/user/wine_dataset.yaml's first step writes it
    if not wine.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "export_sklearn.py"), "wine", str(wine)],
                       check=True, cwd=ROOT, capture_output=True)
    configs = sorted((ROOT / "configs").glob("*/*.yaml"))
    per: dict[str, float] = {}
    user_code: dict[str, float] = {}
    for path in configs:
        s = median_of([*cli, str(path)], args.repeat)
        # A function task is checked by importing the user's module and calling it on a probe batch, so its
        # validation pays for that module's imports (torch, here): reported apart from the target.
        imports_user_code = "kind: function" in path.read_text()
        (user_code if imports_user_code else per)[str(path.relative_to(ROOT))] = s
        print(f"{s:6.3f} s  {path.relative_to(ROOT)}{'  (imports the target function)' if imports_user_code else ''}",
              flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bad = Path(tmp) / "typo.yaml"
        bad.write_text("modle: {unit: relu}\n")
        rejected = median_of([*cli, str(bad)], args.repeat, expect=2)
    print(f"{rejected:6.3f} s  (a config with a typo, rejected)")
    startup = median_of([sys.executable, "-c", "pass"], args.repeat)
    vals = list(per.values())
    print(json.dumps({"configs": len(vals), "median_s": round(statistics.median(vals), 3),
                      "max_s": round(max(vals), 3), "rejected_s": round(rejected, 3),
                      "python_startup_s": round(startup, 3), "target_s": TARGET_S,
                      "function_target_configs_s": {k: round(v, 3) for k, v in user_code.items()},
                      "under_target": max(vals) < TARGET_S, "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
