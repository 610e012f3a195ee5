"""Fixed start-up cost: from the command to the driver's receipt of the first report of a network (its step-0
test loss, computed on a worker just before its first training step), for a small sweep, as a user runs it.

    python bench/startup.py [--repeat 3] [--backend ray|local]

Runs `mfsweep scaling` in a fresh process (8 widths x 4 seeds, 300 SGD steps: the issue's small sweep) and
reads from its MLflow store the timestamp of the first metric the driver logged for any network (the tracker
stamps a point when the driver hands it over; MLflow stores it in ms).
Prints one line per run, then one JSON object last: start_to_first_report_s (median), total_s (median),
cpu_s_to_first_report (median: CPU seconds the whole machine spent, every process, between the command and the
first report, from /proc/stat sampled every 50 ms; with ``cores`` it says whether the start-up was waiting or
short of CPU), target_s 5.0, load_avg_1min. Load on the machine shifts these figures.
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETS = ["sweep.widths=[16,32,64,128,256,512,1024,2048]", "sweep.seeds=4", "dynamics.steps=300",
        "sweep.variants=[]", "dynamics.stop.rule=fixed", "dynamics.lr_schedule.kind=constant"]


def busy_s() -> float:
    """CPU seconds the machine has spent busy since boot (all cores, all processes); NaN off Linux."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class BusySampler:
    """(wall time, busy CPU seconds) every 50 ms while running, to read the CPU spent up to a moment known
    only afterwards (the first report's timestamp, from the store)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), busy_s()))
            self._stop.wait(0.05)

    def __enter__(self) -> BusySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def spent(self, t0: float, t1: float) -> float:
        """Busy CPU seconds between ``t0`` and ``t1`` (the samples nearest each)."""
        def at(t: float) -> float:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]
        return at(t1) - at(t0)


def once(backend: str) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "orchestrator.cli", "scaling", "--out", str(out), "--no-progress",
               "--backend", backend]
        for s in SETS:
            cmd += ["--set", s]
        with BusySampler() as busy:
            time.sleep(0.1)  # a sample before the start
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            total = time.time() - t0
        with sqlite3.connect(out / "mlflow.db") as db:
            (first_ms,) = db.execute("SELECT MIN(timestamp) FROM metrics WHERE key = 'test_loss'").fetchone()
        return first_ms / 1000.0 - t0, total, busy.spent(t0, first_ms / 1000.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", choices=["ray", "local"], default="ray")
    args = ap.parse_args()
    firsts, totals, cpus = [], [], []
    for _ in range(args.repeat):
        first, total, cpu = once(args.backend)
        firsts.append(first)
        totals.append(total)
        cpus.append(cpu)
        print(f"first report after {first:6.2f} s ({cpu:5.1f} CPU s on the machine), done after {total:6.2f} s",
              flush=True)
    print(json.dumps({"bench": "startup", "backend": args.backend,
                      "start_to_first_report_s": round(statistics.median(firsts), 2),
                      "total_s": round(statistics.median(totals), 2),
                      "cpu_s_to_first_report": round(statistics.median(cpus), 1), "cores": os.cpu_count(),
                      "target_s": 5.0,
                      "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
