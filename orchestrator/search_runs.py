"""Every trial's MLflow child run in ``mfsweep search``: created when the trial (or one of its extra-stage
networks) starts, ended with the trial's final state, and made good on the next start for trials a killed
driver told without ending their run (``mlflow_synced.json`` in the output folder lists the trials whose run
is final)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optuna import Study
from optuna.trial import FrozenTrial, TrialState

from .config import ConfigError, ScalingConfig
from .ledger import Ledger
from .plan import network_settings
from .search_config import SearchConfig
from .search_report import PS_ATTR
from .study import KEY_ATTR, REASON_ATTR

if TYPE_CHECKING:  # mlflow loads in the tracker's thread, beside the pool's start
    from .tracking import Tracker

SYNCED_FILE = "mlflow_synced.json"


class TrialRuns:
    """The MLflow side of a search's trials, under the search's parent run."""

    def __init__(self, cfg: SearchConfig, out: Path, tracker: Tracker, ledger: Ledger, parent: str,
                 resolve: Callable[[Mapping[str, Any]], tuple[ScalingConfig, int]], *, compute_resource: bool,
                 search_key: str) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.ledger = ledger
        self.parent = parent
        self._resolve = resolve
        self._compute_resource = compute_resource
        self._search_key = search_key
        self._path = out / SYNCED_FILE

    def start(self, number: int, params: Mapping[str, Any], width: int, steps: int,
              tcfg: ScalingConfig | None, suffix: str = "") -> str:
        """The child run of trial ``number`` (``suffix``: of one of its extra-stage networks)."""
        key = f"trial-{number:05d}{suffix}"
        p: dict[str, Any] = {**params, "trial_number": number, "width": width, "steps": steps}
        if tcfg is not None:
            p.update({"unit": tcfg.model.unit.value, "batch_size": tcfg.dynamics.batch_size,
                      **network_settings(tcfg)})
        name = f"trial {number} width={width}"  # the MLflow run name; ``key`` stays the stable identity
        if suffix.startswith("-seed"):
            name += f" seed={suffix.removeprefix('-seed')} (re-evaluation)"
        elif suffix:
            name += " (fidelity)"
        return self.tracker.start_child(self.parent, key, name, p, {"mfsweep.trial_number": str(number)})

    def end(self, run_id: str, t: FrozenTrial) -> None:
        """End a trial's run with its final state, result and particle-steps."""
        final: dict[str, float] = {}
        ps = t.user_attrs.get(PS_ATTR)
        if ps is not None:
            final[PS_ATTR] = float(ps)
        if t.user_attrs.get("steps_trained") is not None:
            final["steps_trained"] = float(t.user_attrs["steps_trained"])
        if t.values:
            final["final_test_loss"] = float(t.values[0])
        step = int(t.user_attrs.get("steps_trained") or t.last_step or 0)
        reason = str(t.user_attrs.get(REASON_ATTR, "")) or ("retried" if t.state == TrialState.FAIL else "")
        status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}.get(t.state, "FAILED")
        self.ledger.close_run(run_id, final, step, {"optuna.state": t.state.name, "mfsweep.reason": reason[:500],
                                                    "mfsweep.trial_number": str(t.number)}, status)

    def synced(self) -> set[int]:
        return set(json.loads(self._path.read_text())) if self._path.exists() else set()

    def mark_synced(self, numbers: Sequence[int]) -> None:
        """Record that these trials' runs are final (after the tracker has stored their ends)."""
        self.tracker.flush()
        synced = self.synced() | set(numbers)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(synced)))
        os.replace(tmp, self._path)

    def sync(self, study: Study) -> None:
        """Give every finished trial of this search a final child run (trials a killed driver told, or failed
        on recovery, may lack one), with its curve from the study's intermediate values."""
        synced = self.synced()
        todo = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()
                and t.number not in synced and t.user_attrs.get(KEY_ATTR) == self._search_key]
        for t in todo:
            width = int(t.user_attrs.get("width", self.cfg.search.trial_width))
            steps = int(t.user_attrs.get("steps", self.cfg.steps_for(width)))
            try:
                tcfg: ScalingConfig | None = self._resolve(t.params)[0]
            except ConfigError:
                tcfg = None
            run = self.start(t.number, t.params, width, steps, tcfg)
            for step, v in sorted(t.intermediate_values.items()):
                at = step // width if self._compute_resource else step  # Optuna's step may be particle-steps
                self.ledger.send(run, {"test_loss": v}, at)  # a reused run's stored steps are dropped
            self.end(run, t)
        if todo:
            self.mark_synced([t.number for t in todo])
