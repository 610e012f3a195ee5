"""What a sweep leaves behind: per variant the fit of its recorded results (:mod:`.analysis`), summary.json,
scaling.png and curves.png, the parent MLflow run's numbers, and the console table."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from rich.console import Console
from rich.table import Table

from . import analysis, mlflow_view
from .config import ScalingConfig
from .credentials import redact
from .curves import MeanCurves, curve_name
from .ledger import NetworkResult

if TYPE_CHECKING:
    from .tracking import Tracker

__all__ = ["ScalingReport"]


def _point_json(r: NetworkResult) -> dict[str, Any]:
    """A network's line in summary.json: its result (the final-window mean), how sure, and whether converged."""
    return {"width": r.width, "seed": r.replicate, "test_loss": r.result_loss, "test_loss_se": r.final_loss_se,
            "converged": r.converged, "stop_step": r.step, "final_slope": r.final_slope,
            "last_test_loss": r.final_test_loss, "status": r.status}


class SummaryPoints(Sequence[dict[str, Any]]):
    """A variant's points in the summary, each made from its record when read (100k point dicts held at once
    would be ~40 MB of the report's peak); :func:`write_summary` writes them one at a time."""

    def __init__(self, records: Sequence[NetworkResult]) -> None:
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, i: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, i: slice) -> list[dict[str, Any]]: ...

    def __getitem__(self, i: int | slice) -> dict[str, Any] | list[dict[str, Any]]:
        if isinstance(i, slice):
            return [_point_json(r) for r in self._records[i]]
        return _point_json(self._records[i])


def write_summary(summary: Mapping[str, Any], path: Path) -> None:
    """summary.json, indented, with each variant's points a line each, made and written one at a time: the
    summary's other values go through the JSON encoder, which hands a marker in for each SummaryPoints."""
    lazy: dict[str, SummaryPoints] = {}

    def mark(o: object) -> str:
        if not isinstance(o, SummaryPoints):
            raise TypeError(f"{type(o).__name__} is not JSON serializable")
        marker = f"\0mfsweep-points-{len(lazy)}"
        lazy[json.dumps(marker)] = o
        return marker

    with path.open("w") as fh:
        for chunk in json.JSONEncoder(indent=1, allow_nan=True, default=mark).iterencode(summary):
            points = lazy.get(chunk)
            if points is None:
                fh.write(chunk)
                continue
            fh.write("[")
            for i, p in enumerate(points):
                fh.write(",\n    " if i else "\n    ")
                json.dump(p, fh, allow_nan=True)
            fh.write("\n   ]" if points else "]")


@dataclass
class ScalingReport:
    """The report of one sweep from its recorded results (and this session's curves)."""

    cfg: ScalingConfig
    out: Path
    tracker: Tracker
    parent: str
    tracking_uri: str
    results: dict[int, NetworkResult]
    variants: list[tuple[str, ScalingConfig]]
    curves: MeanCurves
    """This session's test-loss curves, averaged over seeds per (variant, width)."""
    cap: dict[str, int]
    """Step cap per variant."""

    def finish(self) -> dict[str, Any]:
        """Fit every variant; summary.json, scaling.png, curves.png, the parent run's numbers and end, the
        table."""
        analyses: dict[str, analysis.VariantAnalysis] = {}
        out_variants = []
        for name, _ in self.variants:
            recs = [r for r in sorted(self.results.values(), key=lambda r: r.net_id) if r.variant == name]
            pts = [analysis.Point(r.width, r.replicate, r.result_loss, r.status, se=r.final_loss_se,
                                  converged=r.converged) for r in recs]
            a = analyses[name] = analysis.analyse(pts, seed=self.cfg.sweep.seed)
            law = a.power  # the exponent is the converged points' fit: the long-time law or nothing
            out_variants.append({
                "name": name,
                "exponent": law.exponent if law else None,
                "exponent_ci95": list(law.exponent_ci95) if law else None,
                "prefactor": law.prefactor if law else None,
                "r2": law.r2 if law else None,
                **a.to_json(),
                "points": SummaryPoints(recs),
            })
            self.tracker.log_metrics(self.parent, _parent_metrics(name, a), 0)
            self.tracker.set_tags(self.parent, {f"mfsweep.regime.{name}": a.regime or "none",
                                                f"mfsweep.verdict.{name}": a.verdict()[:500]})
        mlflow_view.log_loss_vs_width(self.tracker, self.parent, {n: a.points for n, a in analyses.items()})
        mlflow_view.describe(self.tracker, self.parent, mlflow_view.result_paragraph(
            self.cfg.name, self.cfg.sweep.widths, self.cfg.sweep.seeds, analyses))
        summary = {
            "sweep": self.cfg.name,
            "variants": out_variants,
            "mlflow": {"tracking_uri": redact(self.tracking_uri), "experiment_id": self.tracker.experiment_id,
                       "parent_run_id": self.parent},
        }
        write_summary(summary, self.out / "summary.json")  # streamed: at 100k points the text is ~100 MB
        artifacts = [self.out / "summary.json"]
        if any(a.n_points for a in analyses.values()):
            artifacts.append(analysis.plot_scaling(analyses, self.out / "scaling.png",
                                                   f"{self.cfg.name}: test loss vs width"))
        curves = self._mean_curves()
        if curves:
            title = f"{self.cfg.name}: test loss (mean over seeds; a stopped network at its last value)"
            artifacts.append(analysis.plot_curves(curves, self.out / "curves.png", title))
        self.tracker.flush()
        for path in artifacts:
            self.tracker.log_artifact(self.parent, path)
        self.tracker.end_run(self.parent, "FINISHED")
        self._print_table(analyses)
        return summary

    def _mean_curves(self) -> dict[str, list[tuple[int, float]]]:
        """Seed-averaged test-loss curve per (variant, width) from this session's reports (a network that
        stopped counts at its last value), panels and legends in the config's order."""
        return self.curves.means(curve_name(name, w) for name, vcfg in self.variants for w in vcfg.sweep.widths)

    def _print_table(self, analyses: dict[str, analysis.VariantAnalysis]) -> None:
        """Rows = widths, columns = variants (fits a terminal for any number of widths), then the fits, then
        what they mean in words, and how to continue a sweep whose points have not converged."""
        table = Table(title=f"{self.cfg.name}: test loss by width",
                      caption="mean over seeds of each network's final-window mean; (k/m conv.): converged "
                              "networks of m. exponent: loss ~ width^exponent on converged points (theory: -1 "
                              "at long times)")
        table.add_column("width", justify="right")
        for name in analyses:
            table.add_column(name, justify="right")
        for w in self.cfg.sweep.widths:
            row = [str(w)]
            for a in analyses.values():
                pts = [p for p in a.points if p.width == w]
                vals = [p.test_loss for p in pts if p.status == "finished" and p.test_loss is not None]
                conv = sum(1 for p in pts if p.converged)
                bad = sum(1 for p in pts if p.status != "finished")
                cell = f"{sum(vals) / len(vals):.3g} ({conv}/{len(pts)} conv.)" if vals else "-"
                row.append(cell + (f" ({bad} not finished)" if bad else ""))
            table.add_row(*row)
        table.add_section()
        table.add_row("exponent", *[_fit_cell(a.power) for a in analyses.values()])
        table.add_row("all points", *[_fit_cell(a.power_all) for a in analyses.values()])
        table.add_row("regime", *[a.regime or "-" for a in analyses.values()])
        console = Console()
        console.print(table)
        for name, a in analyses.items():
            console.print(f"[bold]{name}[/]: {a.verdict()}", soft_wrap=True, highlight=False)
        n = sum(a.n_points for a in analyses.values())
        conv = sum(a.n_converged for a in analyses.values())
        if n and conv < n / 2:
            steps = max(self.cap.values()) * 4
            console.print(f"[yellow]{n - conv} of {n} networks have not converged, so the exponents above are not "
                          f"the long-time law; continue the sweep with: mfsweep resume {self.out} "
                          f"--set dynamics.steps={steps}[/]", soft_wrap=True, highlight=False)


def _fit_cell(fit: analysis.Fit | None) -> str:
    if fit is None:
        return "-"
    lo, hi = fit.exponent_ci95
    return f"{fit.exponent:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _parent_metrics(name: str, a: analysis.VariantAnalysis) -> dict[str, float]:
    """The parent run's per-variant numbers (MLflow metrics hold no None)."""
    out = {f"{name}.n_points": float(a.n_points), f"{name}.n_converged": float(a.n_converged)}
    for prefix, fit in ((name, a.power), (f"{name}.all_points", a.power_all)):
        if fit is not None:
            out.update({f"{prefix}.exponent": fit.exponent, f"{prefix}.exponent_ci95_lo": fit.exponent_ci95[0],
                        f"{prefix}.exponent_ci95_hi": fit.exponent_ci95[1], f"{prefix}.prefactor": fit.prefactor,
                        f"{prefix}.r2": fit.r2})
    if a.floor is not None:
        out.update({f"{name}.floor.alpha": a.floor.alpha, f"{name}.floor.l_inf": a.floor.l_inf})
    return {k: v for k, v in out.items() if math.isfinite(v)}
