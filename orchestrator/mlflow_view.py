"""What a sweep looks like in the MLflow UI: run names that say what a run is, the error-vs-width curve as
metrics MLflow can draw and overlay, and a one-paragraph result as the parent run's description.

No mlflow import here: everything goes through :class:`orchestrator.tracking.Tracker`. The experiment kind
tag (so the UI opens an experiment on its training runs, not on the GenAI overview) is set by the Tracker.

The curve: the parent run logs ``loss_vs_width/<variant>`` with **step = width** and value = the mean final
test loss over the finished seeds of that width. MLflow's line charts plot metrics against steps, so the
run's "Model metrics" section draws one error-vs-width curve per variant, and selecting several sweeps'
parent runs in the experiment's chart view overlays their curves (set the axes to log scale there).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # mlflow's import is slow; the drivers load it beside Ray's boot
    from .tracking import Tracker

NOTE_TAG = "mlflow.note.content"
"""The run (or experiment) description MLflow's UI shows and edits (Markdown)."""
CURVE_PREFIX = "loss_vs_width/"


class _Point(Protocol):
    @property
    def width(self) -> int: ...
    @property
    def test_loss(self) -> float | None: ...
    @property
    def status(self) -> str: ...


class _Fit(Protocol):
    @property
    def exponent(self) -> float: ...
    @property
    def exponent_ci95(self) -> tuple[float, float]: ...
    @property
    def r2(self) -> float: ...


def parent_run_name(name: str, kind: str, when: float | None = None) -> str:
    """'spin3 sweep 2026-12-02 14:05': the sweep (or study) and when it started."""
    return f"{name} {kind} {time.strftime('%Y-%m-%d %H:%M', time.localtime(when))}"


def child_run_name(variant: str, width: int, seed: int) -> str:
    """'bd_clone width=256 seed=2': one network of a sweep."""
    return f"{variant} width={width} seed={seed}"


def group_run_name(variant: str, width: int) -> str:
    """A (variant, width) group run's name (``tracking.runs: group``): its seeds are metric-key prefixes."""
    return f"{variant} width={width}"


def curve_key(variant: str) -> str:
    """MLflow metric name of a variant's error-vs-width curve (characters MLflow refuses become '_')."""
    return CURVE_PREFIX + re.sub(r"[^A-Za-z0-9_\-. :/]", "_", variant)


def mean_by_width(points: Sequence[_Point]) -> dict[int, float]:
    """Mean final test loss per width over the finished networks with a finite loss (as the sweep's table)."""
    acc: dict[int, list[float]] = {}
    for p in points:
        if p.status == "finished" and p.test_loss is not None and math.isfinite(p.test_loss):
            acc.setdefault(p.width, []).append(p.test_loss)
    return {w: sum(v) / len(v) for w, v in sorted(acc.items())}


def log_loss_vs_width(tracker: Tracker, run_id: str, per_variant: Mapping[str, Sequence[_Point]]) -> None:
    """One ``loss_vs_width/<variant>`` point per width (step = width) on the sweep's parent run."""
    for variant, points in per_variant.items():
        for width, mean in mean_by_width(points).items():
            tracker.log_metrics(run_id, {curve_key(variant): mean}, width)


def _span(widths: Sequence[int]) -> str:
    ws = sorted(widths)
    return f"width {ws[0]}" if len(ws) == 1 else f"widths {ws[0]}–{ws[-1]} ({len(ws)} widths)"


class _Analysis(Protocol):
    @property
    def points(self) -> Sequence[_Point]: ...

    @property
    def n_converged(self) -> int: ...

    def verdict(self) -> str: ...


def result_paragraph(name: str, widths: Sequence[int], seeds: int, per_variant: Mapping[str, _Analysis]) -> str:
    """The sweep's result in one paragraph (Markdown): what ran, how many networks converged, and each
    variant's verdict in words (the exponent on converged points with its 95% interval, or why there is none)."""
    points = [p for a in per_variant.values() for p in a.points]
    done = sum(1 for p in points if p.status == "finished")
    conv = sum(a.n_converged for a in per_variant.values())
    parts = [f"**{variant}**: {a.verdict()}" for variant, a in per_variant.items()]
    return (f"**{name}**: test loss vs width, {len(per_variant)} variant(s) × {_span(widths)} × {seeds} "
            f"seed(s); {done} of {len(points)} networks finished, {conv} converged (stationary test loss over "
            f"their final window). Loss ∝ width^a fitted on converged points (95% bootstrap interval over seeds): "
            f"{'; '.join(parts)}. Mean-field theory predicts a = −1 once training has converged "
            "(docs/science.md and docs/convergence.md in the mfsweep repository). The curves are this run's "
            "`loss_vs_width/<variant>` metrics (step = width; select several sweeps in the chart view to overlay "
            "them); each network is a child run.")


def ui_page(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The experiment's page in the MLflow UI, on its runs. MLflow 3.17's UI picks GenAI or model-training
    pages from a global toggle, not from the experiment's kind tag, and opens on GenAI's trace overview; the
    query parameter selects model training (the UI then remembers it)."""
    return f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning"


def describe(tracker: Tracker, run_id: str, text: str) -> None:
    """Set the run's description (shown at the top of its page in the MLflow UI)."""
    tracker.set_tags(run_id, {NOTE_TAG: text})


SCALING_EXPERIMENT_NOTE = (
    "Error-vs-width sweeps run by mfsweep. Each sweep is a parent run (named after the sweep and its start "
    "time) whose description gives the fitted exponents and whose `loss_vs_width/<variant>` metrics draw the "
    "error-vs-width curves (step = width); its child runs are the individual networks (variant, width, seed) "
    "with their training curves.")
SEARCH_EXPERIMENT_NOTE = (
    "Optuna searches run by mfsweep. Each search is a parent run (named after the study and its start time) "
    "whose description gives the best trial; its child runs are the trials, with their training curves.")


def search_paragraph(study: str, n_trials: int, states: Mapping[str, int], best: Mapping[str, object] | None
                     ) -> str:
    """A search's result in one paragraph: what finished, and the best trial."""
    counts = ", ".join(f"{v} {k.lower()}" for k, v in states.items())
    if best is None:
        head = "no trial completed"
    else:
        value = best.get("value")
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        head = f"best: trial {best.get('number')} with {best.get('value_is', 'test loss')} {shown}, parameters " \
               f"{best.get('params')}"
    return (f"**{study}**: {n_trials} trials ({counts}); {head}. Each trial is a child run; `best_config.yaml` "
            "(artifact) runs straight through `mfsweep scaling`.")
