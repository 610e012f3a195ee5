"""Stopping by stationarity vs a fixed step count, on the quick-start problem.

    python bench/converge.py                       # the embedded quick-start sweep, its own cap
    python bench/converge.py --set dynamics.steps=12000 --set "sweep.widths=[16,64,256]"

Runs `mfsweep scaling` twice on the same config (same seeds, same batches), side by side in one process
tree: (a) `dynamics.stop.rule=fixed` (every network trains to the cap), (b) `dynamics.stop.rule=plateau` (a
network stops when its test loss is stationary over its window). Reports the wall time, the particle-steps
actually trained (sum of width x stop step), the converged share, and per variant the exponent on converged
points and on all points, with intervals. Prints one JSON line last. Target (issue 10): >= 30% fewer
particle-steps with the plateau rule, at an exponent whose interval overlaps the fixed-steps one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(rule: str, sets: list[str], out: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "scaling", "--out", str(out), "--no-progress",
           "--set", f"dynamics.stop.rule={rule}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    steps = 0
    n = conv = 0
    variants = {}
    for v in summary["variants"]:
        for p in v["points"]:
            steps += p["width"] * p["stop_step"]
            n += 1
            conv += bool(p["converged"])
        variants[v["name"]] = {
            "exponent_converged": v["exponent"], "ci95_converged": v["exponent_ci95"],
            "exponent_all": (v["power_all"] or {}).get("exponent"),
            "ci95_all": (v["power_all"] or {}).get("exponent_ci95"),
            "n_converged": v["n_converged"], "n_points": v["n_points"], "regime": v["regime"]}
    return {"wall_s": round(wall, 1), "particle_steps": steps, "converged": f"{conv}/{n}", "variants": variants}


def overlap(a: list[float] | None, b: list[float] | None) -> bool | None:
    if not a or not b or None in a or None in b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for both runs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-converge-") as tmp:
        fixed = run("fixed", args.sets, Path(tmp) / "fixed")
        plateau = run("plateau", args.sets, Path(tmp) / "plateau")
    saved = 1 - plateau["particle_steps"] / fixed["particle_steps"]  # type: ignore[operator]
    checks = {}
    for name, f in fixed["variants"].items():  # type: ignore[attr-defined]
        p = plateau["variants"][name]  # type: ignore[index]
        # Compare what each run can say: the converged-points exponent where both have one, else all points.
        key = "ci95_converged" if f["ci95_converged"] and p["ci95_converged"] else "ci95_all"
        checks[name] = {"compared": key, "intervals_overlap": overlap(f[key], p[key])}
    line = {"bench": "converge", "sets": args.sets, "fixed": fixed, "plateau": plateau,
            "particle_steps_saved": round(saved, 3), "target_saved": 0.3, "overlap": checks}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
