"""Figures and tables of docs/results.md, computed from the paper-reproduction runs (never typed in by hand).

    python docs/make_figures.py [--runs runs/papers] [--docs docs]

Reads, for every experiment of configs/papers/ that has a finished run in ``RUNS/<name>/`` (the folder
``mfsweep scaling configs/papers/<name>.yaml --out RUNS/<name>`` writes): its ``summary.json`` (final losses,
fitted exponents) and its MLflow store ``mlflow.db`` (test/train loss of every network at every reported
step, wall time of the sweep). Writes PNGs to ``DOCS/figures/`` and replaces the text between the markers
``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` in ``DOCS/results.md`` with the tables. An
experiment without a run keeps its old text and is listed as missing.

Conventions: "mean" over seeds is the geometric mean (the average a log-log fit passes through); the
steps to reach a target energy are read off the seed-mean curve at the reporting resolution
(dynamics.eval_every) and are "-" when the target is never reached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.analysis import Point, fit_scaling  # noqa: E402

MAX_PNG_BYTES = 300_000


@dataclass(frozen=True)
class Experiment:
    name: str
    """Config configs/papers/<name>.yaml and run folder <runs>/<name>."""
    title: str
    baseline: str
    """Variant the steps-to-target ratios are taken against."""
    targets: Sequence[float]
    """Energies for the steps-to-target table."""
    exponent_vs_time: bool = False
    """Fit loss ~ n^exponent at every reported step (experiment 4)."""
    train_loss: bool = False
    """Also tabulate the final training loss (GD on a fixed training set)."""
    config: str = ""
    """Config file when it differs from configs/papers/<name>.yaml (a --set variant of another run)."""
    command_extra: str = ""
    variants: Sequence[str] = field(default_factory=tuple)
    """Variant order in figures (default: the summary's order)."""
    at_steps: Sequence[int] = ()
    """Tabulate the test loss at these steps, and its ratio to the baseline's on the same replicate."""
    log_steps: bool = False
    """Log-scale step axis in the curves figure."""


EXPERIMENTS = [
    Experiment("bd_closed_form", "Example A, uniform init: GD vs birth-death (exact energy)", "gd",
               (1e-2, 3e-3, 1e-3, 5e-4, 3e-4, 1e-4)),
    Experiment("bd_closed_form_badinit", "Example A, bad init y ~ -2 + 0.1 N(0,1)", "gd",
               (3e-2, 1.5e-2, 1e-2, 3e-3, 1e-3, 3e-4)),
    Experiment("bd_teacher", "Example B, student-teacher ReLU (d = 50, n = 50, SGD), shortened (2e4 steps)",
               "sgd", (2e-2, 1.5e-2, 1.2e-2, 1e-2, 8e-3)),
    Experiment("bd_teacher_full", "Example B at full length (1e5 steps)", "sgd",
               (1.5e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3), config="configs/papers/bd_teacher.yaml",
               command_extra=" --set dynamics.steps=100000 --set dynamics.birth_death.quench=30000"
                             " --set dynamics.eval_every=500"),
    Experiment("bd_teacher_notebook", "Example B in the authors' notebook setting (dt = 0.04, per-step rates)", "sgd",
               (2e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1.5e-3), at_steps=(3000, 30000, 100000), log_steps=True),
    Experiment("bd_teacher_fullbatch", "Example B's problem with full-batch GD on a fixed training set", "gd",
               (2e-2, 1.5e-2, 1.2e-2, 1e-2, 8e-3), train_loss=True),
    Experiment("spin3_width", "3-spin energy on S^3: error vs width, ReLU / Gaussian units, SGD / GD",
               "relu_sgd", (1e-2, 3e-3, 1e-3, 5e-4), train_loss=True, exponent_vs_time=True),
    Experiment("quickstart", "3-spin on S^3, ReLU SGD with a decaying step, each network trained until converged",
               "sgd", (1e-2, 3e-3, 1e-3, 5e-4), config="orchestrator/quickstart.yaml"),
    Experiment("mf_vs_ntk_teacher", "Mean-field vs NTK scaling on the teacher task at equal dt", "mean_field",
               (1e-2, 3e-3, 1e-3, 3e-4), exponent_vs_time=True),
    Experiment("bd_width_closed_form", "Birth-death vs width, exact energy (example A, uniform init)", "gd",
               (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5), exponent_vs_time=True),
    Experiment("bd_width_teacher", "Birth-death vs width, SGD on the teacher task (d = 50)", "sgd",
               (2e-2, 1.5e-2, 1e-2, 7e-3), exponent_vs_time=True),
]


# --------------------------------------------------------------------------- reading a run


@dataclass
class Run:
    summary: dict
    curves: dict[tuple[str, int], dict[int, dict[int, float]]]
    """(variant, width) -> replicate -> {step: test_loss}."""
    train_final: dict[tuple[str, int], dict[int, float]]
    """(variant, width) -> replicate -> last reported train loss."""
    wall_s: float | None
    tags: dict[str, str]
    config: dict
    config_variant_bd: dict[str, bool] = field(default_factory=dict)
    """variant -> whether it runs birth-death (set by render)."""


def read_run(folder: Path) -> Run:
    import yaml
    from mlflow.tracking import MlflowClient

    summary = json.loads((folder / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{(folder / 'mlflow.db').resolve()}")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    wall = None
    if parent.info.end_time and parent.info.start_time:
        wall = (parent.info.end_time - parent.info.start_time) / 1000.0
    children = client.search_runs(exp_ids, filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                  max_results=50_000)
    curves: dict[tuple[str, int], dict[int, dict[int, float]]] = {}
    train: dict[tuple[str, int], dict[int, float]] = {}
    for ch in children:
        p = ch.data.params
        key = (p["variant"], int(p["width"]))
        rep = int(p["replicate"])
        hist = client.get_metric_history(ch.info.run_id, "test_loss")
        curves.setdefault(key, {})[rep] = {m.step: m.value for m in hist}
        tr = client.get_metric_history(ch.info.run_id, "train_loss")
        if tr:
            train.setdefault(key, {})[rep] = max(tr, key=lambda m: m.step).value
    config = yaml.safe_load((folder / "config.yaml").read_text())
    return Run(summary, curves, train, wall, dict(parent.data.tags), config)


def geo_mean(vals: Sequence[float]) -> float:
    vals = [v for v in vals if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else math.nan


def mean_curve(per_rep: dict[int, dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps reported by every replicate -> (steps, geometric mean, min, max)."""
    steps = sorted(set.intersection(*[set(c) for c in per_rep.values()]))
    vals = np.array([[per_rep[r][s] for s in steps] for r in sorted(per_rep)], dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        gm = np.exp(np.log(vals).mean(0))
    return np.array(steps), gm, vals.min(0), vals.max(0)


def steps_to(steps: np.ndarray, curve: np.ndarray, target: float) -> int | None:
    hit = np.nonzero(curve <= target)[0]
    return int(steps[hit[0]]) if hit.size else None


# --------------------------------------------------------------------------- figures


def _fig(w: float = 7.0, h: float = 4.5, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=90)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    if path.stat().st_size > MAX_PNG_BYTES:
        raise SystemExit(f"{path} is {path.stat().st_size} bytes (> {MAX_PNG_BYTES}); lower the dpi")
    return path


def plot_energy_curves(run: Run, exp: Experiment, variants: list[str], widths: list[int], path: Path) -> Path:
    """Seed-mean test loss vs step (log y), one line per variant; one panel per width (at most 3 shown:
    smallest, middle, largest) so widths do not clutter a panel."""
    shown = widths if len(widths) <= 3 else [widths[0], widths[len(widths) // 2], widths[-1]]
    fig, axes = _fig(4.2 * len(shown) + 0.6, 4.2, ncols=len(shown))
    for ax, w in zip(axes, shown, strict=True):
        for i, v in enumerate(variants):
            if (v, w) not in run.curves:
                continue
            steps, gm, lo, hi = mean_curve(run.curves[(v, w)])
            ok = np.isfinite(gm) & (gm > 0) & ((steps > 0) if exp.log_steps else True)
            ax.plot(steps[ok], gm[ok], color=f"C{i}", lw=1.4, label=v)
            ax.fill_between(steps[ok], np.maximum(lo[ok], 1e-300), hi[ok], color=f"C{i}", alpha=0.15, lw=0)
        quench = run.config["dynamics"]["birth_death"]["quench"]
        total = run.config["dynamics"]["steps"]
        if quench and any(run.config_variant_bd.get(v) for v in variants):
            ax.axvline(total - quench, color="0.5", ls=":", lw=1.0, label="birth-death off (quench)")
        for t in exp.targets:
            ax.axhline(t, color="0.85", lw=0.6, zorder=0)
        ax.set_yscale("log")
        if exp.log_steps:
            ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("test loss" + (" (= exact energy)" if run.config["task"]["kind"] == "gaussian_mixture"
                                     else ""))
        ax.set_title(f"n = {w}", fontsize=10)
        ax.grid(True, which="both", alpha=0.2)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{exp.name}\nseed mean (geometric); band = min..max over seeds", fontsize=9)
    return _save(fig, path)


def exponent_series(run: Run, variant: str, widths: list[int]) -> tuple[list[int], list[tuple[float, float, float]]]:
    """Fit loss ~ n^exponent at every step that all networks of the variant reported."""
    per = {w: run.curves[(variant, w)] for w in widths if (variant, w) in run.curves}
    common = sorted(set.intersection(*[set(c) for reps in per.values() for c in reps.values()]))
    steps, fits = [], []
    for s in common:
        if s == 0:
            continue
        pts = [Point(w, r, reps[r][s], "finished") for w, reps in per.items() for r in reps]
        try:
            f = fit_scaling(pts, n_boot=400)
        except ValueError:
            continue
        steps.append(s)
        fits.append((f.exponent, *f.exponent_ci95))
    return steps, fits


def plot_exponent_vs_time(run: Run, exp: Experiment, variants: list[str], widths: list[int], path: Path):
    fig, (ax,) = _fig(7.0, 4.2)
    series = {}
    for i, v in enumerate(variants):
        steps, fits = exponent_series(run, v, widths)
        if not steps:
            continue
        series[v] = (steps, fits)
        e = np.array(fits)
        ax.plot(steps, e[:, 0], color=f"C{i}", lw=1.4, label=v)
        ax.fill_between(steps, e[:, 1], e[:, 2], color=f"C{i}", alpha=0.15, lw=0)
    ax.axhline(-1.0, color="k", ls="--", lw=0.8, label="slope -1 (mean-field CLT)")
    ax.axhline(0.0, color="0.5", lw=0.6)
    ax.set_xlabel("step")
    ax.set_ylabel("fitted exponent of loss ~ n^exponent")
    ax.set_title(f"{exp.name}: exponent at each step (band: 95% bootstrap over seeds)", fontsize=9)
    ax.grid(True, alpha=0.2)
    ax.legend(fontsize=7)
    return _save(fig, path), series


def plot_scaling(run: Run, exp: Experiment, variants: list[str], path: Path) -> Path | None:
    """Final loss vs width per variant with the fit of summary.json (same numbers as the run's scaling.png)."""
    fig, (ax,) = _fig(6.5, 4.5)
    any_fit = False
    for i, v in enumerate(variants):
        rec = next(r for r in run.summary["variants"] if r["name"] == v)
        pts = [p for p in rec["points"] if p["status"] == "finished" and p["test_loss"]]
        if not pts:
            continue
        ws = np.array([p["width"] for p in pts], float)
        ls = np.array([p["test_loss"] for p in pts], float)
        conv = np.array([p.get("converged") is True for p in pts])
        ax.scatter(ws[conv], ls[conv], s=12, alpha=0.5, color=f"C{i}", lw=0)
        ax.scatter(ws[~conv], ls[~conv], s=12, alpha=0.6, facecolors="none", edgecolors=f"C{i}", lw=0.8)
        uw = np.unique(ws)
        gm = [geo_mean(ls[ws == w]) for w in uw]
        ax.plot(uw, gm, "o", color=f"C{i}", ms=5)
        if rec["exponent"] is not None:
            any_fit = True
            lo, hi = rec["exponent_ci95"]
            grid = np.geomspace(uw[0], uw[-1], 50)
            ax.plot(grid, rec["prefactor"] * grid ** rec["exponent"], color=f"C{i}", lw=1.3,
                    label=f"{v}: n^{rec['exponent']:.2f} [{lo:.2f}, {hi:.2f}] ({rec['n_converged']} conv.)")
        elif (rec.get("power_all") or {}).get("exponent") is not None:
            any_fit = True
            pa = rec["power_all"]
            grid = np.geomspace(uw[0], uw[-1], 50)
            ax.plot(grid, pa["prefactor"] * grid ** pa["exponent"], color=f"C{i}", lw=1.0, ls=":",
                    label=f"{v}: all points n^{pa['exponent']:.2f}, not converged ({rec['regime']})")
    if not any_fit:
        return None
    ws_all = sorted({p["width"] for r in run.summary["variants"] for p in r["points"]})
    grid = np.geomspace(ws_all[0], ws_all[-1], 50)
    ax.plot([], [], "k--", lw=0.8, label="slope -1")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ylim = ax.get_ylim()
    for k in range(-12, 4):
        ax.plot(grid, 10.0 ** k * (grid / grid[0]) ** -1.0, "k--", lw=0.4, alpha=0.25)
    ax.set_ylim(ylim)
    ax.set_xlabel("width n")
    ax.set_ylabel("final test loss")
    ax.set_title(f"{exp.name}: final-window loss vs width (filled: converged, hollow: not; fit on converged, "
                 "95% CI)", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7)
    return _save(fig, path)


# --------------------------------------------------------------------------- tables


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine_line(run: Run) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    torch_v = run.tags.get("version.torch", "?")
    gpu = "no GPU (CPU build of torch)" if torch_v.endswith("+cpu") else "GPU status: see torch build"
    wall = f"{run.wall_s:.0f} s" if run.wall_s is not None else "?"
    return (f"Machine: {os.cpu_count()}-core CPU ({cpu}), {gpu}, torch {torch_v}, "
            f"shared with another developer's jobs; sweep wall time (MLflow parent run): **{wall}**; "
            f"git commit {run.tags.get('mfsweep.git_commit', '?')[:10]}.")


def _fit_cell(fit: dict | None) -> str:
    if not fit or fit.get("exponent") is None:
        return "-"
    lo, hi = fit["exponent_ci95"]
    return f"{fit['exponent']:.2f} [{lo:.2f}, {hi:.2f}]"


def render(exp: Experiment, run: Run, fig_dir: Path) -> str:
    variants = list(exp.variants) or [r["name"] for r in run.summary["variants"]]
    widths = sorted({w for (_, w) in run.curves})
    run.config_variant_bd = {}
    for v in run.config["sweep"]["variants"]:
        run.config_variant_bd[v["name"]] = float(v.get("set", {}).get("dynamics.birth_death.rate", 0) or 0) > 0
    parts = []
    cmd_cfg = exp.config or f"configs/papers/{exp.name}.yaml"
    parts.append(f"Command: `mfsweep scaling {cmd_cfg} --out runs/papers/{exp.name}{exp.command_extra}`, then "
                 "`python docs/make_figures.py`.\n")
    parts.append(machine_line(run) + "\n")

    curves_png = plot_energy_curves(run, exp, variants, widths, fig_dir / f"{exp.name}_curves.png")
    parts.append(f"![{exp.name} curves](figures/{curves_png.name})\n")
    scal = plot_scaling(run, exp, variants, fig_dir / f"{exp.name}_scaling.png") if len(widths) > 1 else None
    if scal is not None:
        parts.append(f"![{exp.name} scaling](figures/{scal.name})\n")

    # Final losses (+ fits)
    header = ["variant"] + [f"n = {w}" for w in widths]
    has_fit = len(widths) > 1
    if has_fit:
        header += ["converged", "exponent on converged [95% CI]", "all points [95% CI]", "regime"]
    rows = []
    by_name = {r["name"]: r for r in run.summary["variants"]}
    for v in variants:
        rec = by_name[v]
        row = [f"`{v}`"]
        for w in widths:
            vals = [p["test_loss"] for p in rec["points"] if p["width"] == w and p["status"] == "finished"]
            bad = sum(1 for p in rec["points"] if p["width"] == w and p["status"] != "finished")
            cell = fmt(geo_mean(vals)) if vals else "-"
            if len(vals) > 1:
                cell += f" ({fmt(min(vals), 2)}..{fmt(max(vals), 2)})"
            conv = [p.get("converged") for p in rec["points"] if p["width"] == w and p["status"] == "finished"]
            if conv and all(c is not None for c in conv):
                cell += f" {sum(bool(c) for c in conv)}/{len(conv)}c"
            if bad:
                cell += f" [{bad} not finished]"
            row.append(cell)
        if has_fit:
            row += [f"{rec.get('n_converged', '?')}/{rec.get('n_points', '?')}", _fit_cell(rec.get("power")),
                    _fit_cell(rec.get("power_all")), rec.get("regime", "?")]
        rows.append(row)
    parts.append("Result of each network: mean test loss over its final window; geometric mean over seeds "
                 "(min..max), then k/m c = converged networks of m (docs/convergence.md). The exponent is fitted "
                 "on converged points only; the all-points fit includes unconverged ones and is not the "
                 "long-time law unless the regime is width-limited (docs/analysis.md):\n\n"
                 + table(header, rows) + "\n")
    if has_fit:
        parts.append("Verdicts (summary.json):\n\n" + "\n".join(
            f"- `{v}`: {by_name[v].get('verdict', '-')}" for v in variants) + "\n")

    if exp.at_steps:
        parts.append(at_steps_tables(exp, run, variants, widths))

    if exp.train_loss and run.train_final:
        rows = []
        for v in variants:
            row = [f"`{v}`"]
            for w in widths:
                tr = run.train_final.get((v, w), {})
                te = run.curves.get((v, w), {})
                last_te = [max(c.items())[1] for c in te.values()] if te else []
                row.append(f"{fmt(geo_mean(list(tr.values())))} / {fmt(geo_mean(last_te))}" if tr else "-")
            rows.append(row)
        parts.append("Final train loss / test loss (train loss = mean over the last reporting interval: the "
                     "fixed training set's loss under GD, the fresh batches' under SGD):\n\n"
                     + table(["variant"] + [f"n = {w}" for w in widths], rows) + "\n")

    # Steps to reach fixed energies, and ratios to the baseline
    rows = []
    for w in widths:
        base_curve = run.curves.get((exp.baseline, w))
        base = mean_curve(base_curve) if base_curve else None
        for v in variants:
            if (v, w) not in run.curves:
                continue
            steps, gm, _, _ = mean_curve(run.curves[(v, w)])
            row = [f"`{v}`", str(w)]
            for t in exp.targets:
                s = steps_to(steps, gm, t)
                cell = str(s) if s is not None else "-"
                if base is not None and v != exp.baseline and s:
                    sb = steps_to(base[0], base[1], t)
                    last = int(base[0][-1])
                    cell += f" (x{sb / s:.2g})" if sb else f" (x>{last / s:.2g}: base never)"
                row.append(cell)
            rows.append(row)
    eval_every = run.config["dynamics"]["eval_every"]
    parts.append(f"Steps to reach a fixed energy (seed-mean curve, resolution {eval_every} steps; in brackets "
                 f"the speed-up factor steps(`{exp.baseline}`) / steps(variant); '-' = not reached):\n\n"
                 + table(["variant", "n"] + [f"<= {t:g}" for t in exp.targets], rows) + "\n")

    if exp.exponent_vs_time and len(widths) > 1:
        png, series = plot_exponent_vs_time(run, exp, variants, widths, fig_dir / f"{exp.name}_exponent_vs_step.png")
        parts.append(f"![{exp.name} exponent vs step](figures/{png.name})\n")
        total = max(steps[-1] for steps, _ in series.values())
        marks = sorted({max(1, total // 10), total // 4, total // 2, (3 * total) // 4, total,
                        run.config["dynamics"]["steps"]})
        rows = []
        for v, (steps, fits) in series.items():
            row = [f"`{v}`"]
            for m in marks:
                if m > steps[-1]:
                    row.append("-")
                    continue
                j = min(range(len(steps)), key=lambda i: abs(steps[i] - m))
                e, lo, hi = fits[j]
                row.append(f"{e:.2f} [{lo:.2f}, {hi:.2f}]")
            rows.append(row)
        parts.append("Fitted exponent at selected steps (95% bootstrap interval over seeds):\n\n"
                     + table(["variant"] + [f"step {m}" for m in marks], rows) + "\n")
        rows = []
        for w in widths:
            for v in variants:
                if (v, w) not in run.curves:
                    continue
                steps, gm, _, _ = mean_curve(run.curves[(v, w)])
                row = [f"`{v}`", str(w)]
                for m in marks:
                    j = int(np.argmin(np.abs(steps - m)))
                    row.append(fmt(float(gm[j])) if abs(int(steps[j]) - m) <= eval_every else "-")
                rows.append(row)
        parts.append("Test loss at the same steps (seed mean):\n\n"
                     + table(["variant", "n"] + [f"step {m}" for m in marks], rows) + "\n")
    return "\n".join(parts)


def at_steps_tables(exp: Experiment, run: Run, variants: list[str], widths: list[int]) -> str:
    """Test loss at exp.at_steps (seed geometric mean, min..max) and the paired ratio to the baseline: replicate
    r of every variant starts from the same particles and sees the same batches, so variant_r / baseline_r
    removes the replicate-to-replicate spread."""
    head = ["variant", "n"] + [f"step {s}" for s in exp.at_steps]
    loss_rows, ratio_rows = [], []
    for w in widths:
        base = run.curves.get((exp.baseline, w), {})
        for v in variants:
            reps = run.curves.get((v, w))
            if not reps:
                continue
            row, ratio = [f"`{v}`", str(w)], [f"`{v}`", str(w)]
            for s in exp.at_steps:
                vals = [c[s] for c in reps.values() if s in c]
                row.append(f"{fmt(geo_mean(vals))} ({fmt(min(vals), 2)}..{fmt(max(vals), 2)})" if vals else "-")
                rs = [c[s] / base[r][s] for r, c in reps.items() if s in c and s in base.get(r, {})]
                ratio.append(f"{geo_mean(rs):.2f} ({min(rs):.2f}..{max(rs):.2f})" if rs else "-")
            loss_rows.append(row)
            if v != exp.baseline:
                ratio_rows.append(ratio)
    return ("Test loss at selected steps, 1/2 E|f_n - f|^2 (mfsweep's convention; the notebook's MSE is twice "
            "this), geometric mean over seeds (min..max):\n\n" + table(head, loss_rows) + "\n\n"
            f"Paired ratio to `{exp.baseline}` (replicate r of both: same initial particles, same batches), "
            "geometric mean over seeds (min..max); > 1 = worse than the baseline:\n\n"
            + table(head, ratio_rows) + "\n")


def merge_wall_times(text: str, walls: dict[str, float]) -> dict[str, float]:
    """The wall times of the last full regeneration, updated with this one's (a run regenerated alone with
    --only keeps the other rows), in EXPERIMENTS order."""
    old: dict[str, float] = {}
    block = re.search(r"<!-- generated:wall_times -->\n(.*?)<!-- /generated:wall_times -->", text, re.S)
    if block:
        for name, secs in re.findall(r"^\| `([^`]+)` \| ([0-9.]+) \|$", block.group(1), re.M):
            old[name] = float(secs)
    old.update(walls)
    order = [e.name for e in EXPERIMENTS]
    return {k: old[k] for k in sorted(old, key=lambda k: order.index(k) if k in order else len(order))}


def replace_block(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- generated:{re.escape(name)} -->\n)(.*?)(<!-- /generated:{re.escape(name)} -->)", re.S)
    if not pat.search(text):
        raise SystemExit(f"results.md has no block <!-- generated:{name} --> ... <!-- /generated:{name} -->")
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(3), text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "papers")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs")
    ap.add_argument("--only", nargs="*", default=None, help="experiment names (default: all)")
    args = ap.parse_args(argv)
    fig_dir = args.docs / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    results = args.docs / "results.md"
    text = results.read_text()
    missing = []
    walls: dict[str, float] = {}
    for exp in EXPERIMENTS:
        if args.only and exp.name not in args.only:
            continue
        folder = args.runs / exp.name
        if not (folder / "summary.json").exists():
            missing.append(exp.name)
            continue
        run = read_run(folder)
        if run.wall_s is not None:
            walls[exp.name] = run.wall_s
        text = replace_block(text, exp.name, render(exp, run, fig_dir))
        print(f"{exp.name}: done", file=sys.stderr)
    if walls and "<!-- generated:wall_times -->" in text:
        walls = merge_wall_times(text, walls)
        rows = [[f"`{k}`", f"{v:.0f}"] for k, v in walls.items()]
        rows.append(["**total**", f"**{sum(walls.values()):.0f}**"])
        text = replace_block(text, "wall_times", "Sweep wall times (MLflow parent runs, seconds):\n\n"
                             + table(["run", "wall s"], rows) + "\n")
    results.write_text(text)
    if missing:
        print(f"no run (kept the old text): {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
