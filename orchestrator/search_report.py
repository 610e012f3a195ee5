"""What a search leaves behind once its trials (and extra stages) are done: summary.json, best_config.yaml
(runs straight through ``mfsweep scaling``), Optuna's plots, the parent MLflow run's numbers, the console
table; and the names under which the extra stages (width fidelity, re-evaluation) store their results."""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.table import Table

from . import mlflow_view
from .config import ScalingConfig, dump, load
from .credentials import redact
from .search_config import WIDTH, SearchConfig
from .study import RETRY_ATTR, quiet

if TYPE_CHECKING:
    from .tracking import Tracker

__all__ = ["FIDELITY_PREFIX", "PS_ATTR", "REEVAL_PREFIX", "SearchReport", "budget_counts",
           "fidelity_key", "reeval_key", "reeval_seed", "top"]

PS_ATTR = "particle_steps"
FIDELITY_PREFIX = "mfsweep.fidelity"
REEVAL_PREFIX = "mfsweep.reeval"


def budget_counts(trials: Sequence[FrozenTrial]) -> tuple[int, int, set[int]]:
    """(finished trials that count toward the budget, RUNNING trials, numbers of trials that were retried)."""
    retried = {int(t.user_attrs[RETRY_ATTR]) for t in trials if RETRY_ATTR in t.user_attrs}
    done = sum(1 for t in trials if t.state.is_finished()
               and not (t.state == TrialState.FAIL and t.number in retried))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return done, running, retried


def fidelity_key(width: int, number: int) -> str:
    """The study user attr holding trial ``number``'s result retrained at ``width``."""
    return f"{FIDELITY_PREFIX}.w{width:06d}.t{number:06d}"


def reeval_key(number: int, j: int) -> str:
    """The study user attr holding trial ``number``'s result on its ``j``-th fresh seed."""
    return f"{REEVAL_PREFIX}.t{number:06d}.s{j}"


def reeval_seed(cfg: SearchConfig, j: int) -> int:
    """Fresh seeds: never the search's own (its draws are the ones the pick was lucky on)."""
    return cfg.search.seed + 1 + j


def top(cfg: SearchConfig, study: optuna.Study, k: int | None = None) -> list[FrozenTrial]:
    """The k (default: fidelity.top_k) best complete trials by their single-run value."""
    if k is None:
        assert cfg.search.fidelity is not None
        k = cfg.search.fidelity.top_k
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (t.values[0], t.number))[:k]


@dataclass
class SearchReport:
    """The report of one search (its study as it stands)."""

    cfg: SearchConfig
    study: optuna.Study
    study_name: str
    out: Path
    console: Console
    tracker: Tracker
    parent: str
    storage_desc: str
    tracking_uri: str

    @property
    def single(self) -> bool:
        return self.cfg.search.objective.mode == "single"

    def _reeval_report(self) -> dict[str, Any] | None:
        rv = self.cfg.search.reeval
        if rv is None:
            return None
        attrs = self.study.user_attrs
        rows: list[dict[str, Any]] = []
        for t in top(self.cfg, self.study, rv.top_k):
            recs = [attrs.get(reeval_key(t.number, j)) for j in range(rv.seeds)]
            losses = [None if r is None else r.get("loss") for r in recs]
            got = [v for v in losses if v is not None]
            mean = statistics.fmean(got) if len(got) == rv.seeds else None
            se = statistics.stdev(got) / math.sqrt(len(got)) if mean is not None else None
            rows.append({"number": t.number, "params": t.params, "single_run": t.values[0],
                         "seeds": [reeval_seed(self.cfg, j) for j in range(rv.seeds)], "losses": losses,
                         "mean": mean, "se": se})
        done = [r for r in rows if r["mean"] is not None]
        pick = min(done, key=lambda r: (r["mean"], r["number"])) if done else None
        if pick is not None:
            self.tracker.log_metrics(self.parent, {"reeval.pick_mean": pick["mean"], "reeval.pick_se": pick["se"],
                                                   "reeval.pick_single_run": pick["single_run"]}, 0)
        return {"top_k": rv.top_k, "seeds": rv.seeds, "trials": rows, "pick": pick}

    def _fidelity_report(self) -> dict[str, Any] | None:
        fid = self.cfg.search.fidelity
        if fid is None:
            return None
        from scipy.stats import spearmanr

        attrs = self.study.user_attrs
        rows: list[dict[str, Any]] = []
        for t in top(self.cfg, self.study):
            losses: dict[str, float | None] = {str(fid.widths[0]): float(t.value or math.nan)}
            for w in fid.widths[1:]:
                rec = attrs.get(fidelity_key(w, t.number))
                losses[str(w)] = None if rec is None else rec.get("loss")
            rows.append({"number": t.number, "params": t.params, "losses": losses})
        spearman: dict[str, float | None] = {}
        small = str(fid.widths[0])
        for w in fid.widths[1:]:
            pairs = [(r["losses"][small], r["losses"][str(w)]) for r in rows
                     if r["losses"][str(w)] is not None and r["losses"][small] is not None]
            rho = None
            if len(pairs) >= 3:
                val = float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
                rho = val if math.isfinite(val) else None
            spearman[str(w)] = rho
            if rho is not None:
                self.tracker.log_metrics(self.parent, {f"fidelity.spearman.w{fid.widths[0]}_w{w}": rho}, w)
        largest = str(fid.widths[-1])
        finished = [r for r in rows if r["losses"][largest] is not None]
        best = min(finished, key=lambda r: r["losses"][largest]) if finished else None
        return {"widths": fid.widths, "top_k": fid.top_k, "trials": rows, "spearman": spearman,
                "best_at_largest_width": None if best is None else
                {"number": best["number"], "params": best["params"], "width": fid.widths[-1],
                 "value": best["losses"][largest]}}

    # ------------------------------------------------------------------ results
    def _best(self, fidelity: dict[str, Any] | None, reeval: dict[str, Any] | None
              ) -> tuple[FrozenTrial | None, int | None, float | None]:
        """(best trial, the width its exported config should use, value) for the best-config export: the
        best at the largest fidelity width, else the lowest re-evaluated mean, else the lowest single run."""
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            return None, None, None
        if fidelity is not None and fidelity["best_at_largest_width"] is not None:
            b = fidelity["best_at_largest_width"]
            t = next(tt for tt in complete if tt.number == b["number"])
            return t, int(b["width"]), float(b["value"])
        if reeval is not None and reeval["pick"] is not None:
            t = next(tt for tt in complete if tt.number == reeval["pick"]["number"])
            return t, None, float(reeval["pick"]["mean"])
        t = min(complete, key=lambda tt: tt.values[0])
        return t, None, float(t.values[0])

    def _export_best(self, t: FrozenTrial, width: int | None, value: float) -> Path:
        """The best trial's settings as a scaling config (``mfsweep scaling best_config.yaml``), checked by
        loading it back."""
        tcfg, w = self.cfg.resolve(t.params, width)
        raw = tcfg.model_dump(mode="json")
        raw["name"] = f"{self.cfg.name}_best"
        raw["sweep"]["seed"] = self.cfg.search.seed
        path = self.out / "best_config.yaml"
        head = (f"# Best trial #{t.number} of study '{self.study_name}' (final test loss {value:.6g} at "
                f"width {w}).\n# Run the error-vs-width sweep with it:  mfsweep scaling {path}\n")
        path.write_text(head + dump(ScalingConfig.model_validate(raw)))
        load(path)  # must be valid as it stands
        return path

    def _plots(self) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as ovm

        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        target: Callable[[FrozenTrial], float] | None = None if self.single else (lambda t: t.values[0])
        name = "final test loss"
        plots: list[tuple[str, Callable[[], Any]]] = [
            ("optimization_history.png", lambda: ovm.plot_optimization_history(
                self.study, target=target, target_name=name)),
            ("param_importances.png", lambda: ovm.plot_param_importances(
                self.study, target=target, target_name=name,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=self.cfg.search.sampler.seed))),
            ("parallel_coordinate.png", lambda: ovm.plot_parallel_coordinate(
                self.study, target=target, target_name=name)),
        ]
        if self.single:
            plots.append(("intermediate_values.png", lambda: ovm.plot_intermediate_values(self.study)))
        else:
            plots.append(("pareto_front.png", lambda: ovm.plot_pareto_front(
                self.study, target_names=["final test loss", "particle-steps"])))
        out = []
        for fname, fn in plots:
            if len(complete) < 2 and fname != "intermediate_values.png":
                continue
            try:
                with quiet(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = fn()
                fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                fig.savefig(self.out / fname, dpi=110, bbox_inches="tight")
                plt.close(fig)
                out.append(self.out / fname)
            except Exception as err:  # e.g. importances need two distinct values of a parameter
                why = str(err).splitlines()[0][:150] if str(err) else type(err).__name__
                self.console.print(f"[yellow]no {fname}: {why}[/]", highlight=False)
            plt.close("all")
        return out

    def finish(self) -> dict[str, Any]:
        """summary.json, the plots, best_config.yaml, the parent run's numbers and end, the table."""
        trials = self.study.get_trials(deepcopy=False)
        states = {s: sum(1 for t in trials if t.state.name == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
        _, _, retried = budget_counts(trials)
        fidelity = self._fidelity_report()
        reeval = self._reeval_report()
        best_t, best_w, best_v = self._best(fidelity, reeval)
        summary: dict[str, Any] = {
            "study": self.study_name,
            "n_trials": len(trials),
            "states": states,
            "best": None if best_t is None else {
                "params": best_t.params, "value": best_v, "number": best_t.number,
                "value_is": (f"final test loss at width {best_w}" if best_w is not None else
                             f"mean final test loss over {reeval['seeds']} fresh seeds"
                             if reeval is not None and reeval["pick"] is not None else "final test loss")},
            "mlflow": {"tracking_uri": redact(self.tracking_uri), "experiment_id": self.tracker.experiment_id,
                       "parent_run_id": self.parent},
            "objective": self.cfg.search.objective.mode,
            "retried": sorted(retried),
            # All the training this search did: its trials, plus the fidelity and re-evaluation networks.
            "particle_steps": int(sum(int(t.user_attrs.get(PS_ATTR, 0)) for t in trials)) + int(sum(
                int(v.get(PS_ATTR, 0)) for k, v in self.study.user_attrs.items()
                if k.startswith((FIDELITY_PREFIX, REEVAL_PREFIX)) and isinstance(v, dict))),
            "storage": self.storage_desc,
        }
        if not self.single:
            summary["pareto_front"] = [{"number": t.number, "params": t.params, "values": t.values}
                                       for t in sorted(self.study.best_trials, key=lambda t: t.values[0])]
        if fidelity is not None:
            summary["fidelity"] = fidelity
        if reeval is not None:
            summary["reeval"] = reeval
        artifacts = self._plots()
        if best_t is not None and best_v is not None:
            path = self._export_best(best_t, best_w, best_v)
            summary["best_config"] = str(path)
            artifacts.append(path)
            self.tracker.log_metrics(self.parent, {"best_value": best_v}, 0)
        self.tracker.log_metrics(self.parent, {
            "n_complete": float(states["COMPLETE"]), "n_pruned": float(states["PRUNED"]),
            "n_fail": float(states["FAIL"]), "total_particle_steps": float(summary["particle_steps"])}, 0)
        self.tracker.set_tags(self.parent, {"mfsweep.trials": str(self.cfg.search.trials)})
        mlflow_view.describe(self.tracker, self.parent, mlflow_view.search_paragraph(
            self.study_name, len(trials), states, summary["best"]))
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True, default=str))
        artifacts.insert(0, self.out / "summary.json")
        self.tracker.flush()
        for path in artifacts:
            self.tracker.log_artifact(self.parent, path)
        self.tracker.end_run(self.parent, "FINISHED")
        self._print_table(trials, summary)
        return summary

    def _print_table(self, trials: Sequence[FrozenTrial], summary: Mapping[str, Any]) -> None:
        done = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[0])[:8]
        keys = list(self.cfg.search.space)
        counts = ", ".join(f"{v} {k.lower()}" for k, v in summary["states"].items())
        table = Table(title=f"{self.study_name}: best trials", caption=f"{len(trials)} trials: {counts}")
        table.add_column("#", justify="right")
        for k in keys:
            table.add_column(k.split(".")[-1] if k != WIDTH else WIDTH)
        table.add_column("test loss", justify="right")
        table.add_column("particle-steps", justify="right")
        for t in done:
            cells = [str(t.number)]
            for k in keys:
                v = t.params.get(k, "-")
                cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
            cells += [f"{t.values[0]:.4g}", f"{int(t.user_attrs.get(PS_ATTR, 0)):,}"]
            table.add_row(*cells)
        Console().print(table)
