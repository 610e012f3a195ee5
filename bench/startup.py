"""Fixed start-up cost: from the command to the driver's receipt of the first report of a network (its step-0
test loss, computed on a worker just before its first training step), for a small sweep, as a user runs it.

    python bench/startup.py [--repeat 3] [--backend ray|local]

Runs `mfsweep scaling` in a fresh process (8 widths x 4 seeds, 300 SGD steps: the issue's small sweep) and
reads from its MLflow store the timestamp of the first metric the driver logged for any network (the tracker
stamps a point when the driver hands it over; MLflow stores it in ms).
Prints one line per run, then one JSON object last: start_to_first_report_s (median), total_s (median),
target_s 5.0, load_avg_1min. Load on the machine shifts these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = ["sweep.widths=[16,32,64,128,256,512,1024,2048]", "sweep.seeds=4", "dynamics.steps=300",
        "sweep.variants=[]", "dynamics.stop.rule=fixed", "dynamics.lr_schedule.kind=constant"]


def once(backend: str) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "orchestrator.cli", "scaling", "--out", str(out), "--no-progress",
               "--backend", backend]
        for s in SETS:
            cmd += ["--set", s]
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        total = time.time() - t0
        with sqlite3.connect(out / "mlflow.db") as db:
            (first_ms,) = db.execute("SELECT MIN(timestamp) FROM metrics WHERE key = 'test_loss'").fetchone()
        return first_ms / 1000.0 - t0, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", choices=["ray", "local"], default="ray")
    args = ap.parse_args()
    firsts, totals = [], []
    for _ in range(args.repeat):
        first, total = once(args.backend)
        firsts.append(first)
        totals.append(total)
        print(f"first report after {first:6.2f} s, done after {total:6.2f} s", flush=True)
    print(json.dumps({"bench": "startup", "backend": args.backend,
                      "start_to_first_report_s": round(statistics.median(firsts), 2),
                      "total_s": round(statistics.median(totals), 2), "target_s": 5.0,
                      "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
