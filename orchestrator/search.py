"""``mfsweep search``: Optuna search over architectures and dynamics, trained packed on the worker pool.

The search's policy on the shared driver core: what to run next (trials asked from the study, packed by
:func:`plan.plan`) and what a network's end means (the trial is told: the ledger, :mod:`.ledger`, hands it
over). The study's space, sampler, pruner and storage are in :mod:`.study`.

Execution (asynchronous ask/tell): every worker trains a pack of ``ceil(search.parallel / workers)`` trials;
each trial's parameters are applied to the base config, compatible networks share a pack (same pack key:
task, unit, dynamics schedule, dtype; the per-network settings of :data:`.plan.PER_NETWORK`, e.g. lr or the
birth-death rate, and width differ freely inside a pack). Every report's test loss reaches ``trial.report``; a trial the
pruner stops leaves its pack (``pool.request_retire``) while its pack-mates go on; a trial is told the moment
its network retires; and the moment a pack ends (``on_done`` of the pool), its worker gets a pack of new
trials asked with everything told so far. The particle-steps a trial actually trained (width x steps) are
stored as the user attr ``particle_steps``. After the trials, optional extra stages retrain the best trials:
on fresh seeds (``search.reeval``, the pick becomes the lowest mean) and at larger widths
(``search.fidelity``).

Choices worth knowing:
    * A trial's value is its network's result: the mean test loss over its final window (docs/convergence.md),
      not the last evaluation, which under SGD is one draw from the noise floor. With
      ``dynamics.stop.rule: plateau`` a trial also ends as soon as its loss is stationary.
    * A diverged network (non-finite or huge loss) makes its trial FAIL with the reason in the user attr
      ``mfsweep.reason``; a large made-up value would distort the sampler's model of the loss surface.
    * Every trial trains from the same initial stream and data stream (``search.seed``): trials differ only
      in their parameters (common random numbers), and a retried trial reproduces its numbers.
    * Resume: one driver per output folder (a lock file). On start, trials of this search that a dead
      driver left RUNNING are failed with a reason and re-enqueued once with the same parameters; a failed
      trial that has a retry does not count toward ``search.trials``. RDB storages also get Optuna's
      heartbeat (stale trials of other drivers sharing the study are failed and retried the same way).
      The sampler is reseeded from (seed, trials so far), so a resumed search does not replay its draws.

Output folder layout:
    search.yaml   the resolved search config     state.json        study, storage, search key, MLflow URI
    optuna.journal  the default storage          mlflow_synced.json  trials whose MLflow run is final
    summary.json, best_config.yaml, *.png
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import Console
from rich.progress import Progress

from workers.engine import NetMetrics, NetStatus, NetworkSpec, Retired, derive_seed
from workers.jobs import PackEvent, PackJob

from . import mlflow_view
from .config import ConfigError, ScalingConfig, dump
from .credentials import PASSWORD_ENV, has_password, redact, strip_password
from .driver import Interrupted, close_tracker, open_pool, progress_bar, run_tags
from .ledger import Ledger
from .plan import network_spec as plan_network_spec
from .plan import plan
from .pool import (
    JobFailure,
    PoolError,
    WorkersLost,
    close_in_background,
)
from .runfolder import RunFolder
from .runmeta import flatten, stop_on_signals
from .search_config import WIDTH, SearchConfig, load_search
from .search_report import (
    PS_ATTR,
    SearchReport,
    budget_counts,
    fidelity_key,
    reeval_key,
    reeval_seed,
    top,
)
from .search_runs import TrialRuns
from .study import (
    DRIVER_ATTR,
    KEY_ATTR,
    REASON_ATTR,
    RETRY_ATTR,
    StorageError,
    TrialBook,
    keep_alive,
    make_pruner,
    make_sampler,
    on_stale,
    open_storage,
    suggest,
)
from .userdata import DataShipper

__all__ = ["DRIVER_ATTR", "KEY_ATTR", "PS_ATTR", "REASON_ATTR", "RETRY_ATTR", "SearchRun", "StorageError",
           "make_pruner", "make_sampler", "network_spec", "resume_search", "run_search_cli", "suggest"]

EXIT_SERVICE = 3
HEARTBEAT_S = 10
"""RDB storages: a heartbeat of this driver's running trials every this many seconds."""
GRACE_S = 60
"""... and another driver's trial without one for this long is stale (failed and retried)."""
# Promoted (fidelity) networks need ids that never collide with trial numbers inside a pack.
_PROMOTED_BASE = 1 << 40
_REEVAL_BASE = 1 << 41


def network_spec(tcfg: ScalingConfig, net_id: int, width: int, seed: int) -> NetworkSpec:
    """A trial's network: its resolved config's per-network settings, initialised from ``seed``."""
    return plan_network_spec(tcfg, net_id, width, derive_seed(seed, 0))


# --------------------------------------------------------------------------- one trial in flight


@dataclass
class _Live:
    """A network in flight: a trial's (``trial`` set) or a promoted fidelity run's (``trial`` None)."""

    net_id: int
    number: int
    params: dict[str, Any]
    width: int
    steps: int
    run_id: str
    trial: Trial | None = None
    trial_id: int | None = None
    """The trial's storage id, for heartbeats (RDB storages only)."""
    cfg: ScalingConfig | None = None
    seed: int | None = None
    """Initialisation and data seed (None: the search's)."""
    key: str = ""
    """Extra stages (fidelity, re-evaluation): the study user attr its result goes to."""
    last_step: int = 0
    last_loss: float | None = None
    prune_at: int | None = None
    retired: Retired | None = None
    fail_reason: str | None = None

    @property
    def steps_trained(self) -> int:
        if self.retired is not None:
            return self.retired.step
        return self.last_step

    @property
    def particle_steps(self) -> int:
        return self.width * self.steps_trained


class SearchRun:
    """Runs (or resumes) one search into ``out``.

    Invariants: a trial is told exactly once; a trial a dead driver left RUNNING is failed with a reason and
    retried exactly once with the same parameters; finished trials count toward ``search.trials`` except
    failed ones that were retried; every trial of this search has one MLflow child run whose final state
    matches the trial's.
    """

    def __init__(self, cfg: SearchConfig, out: Path, *, storage: str | None = None, study: str | None = None,
                 tracking_uri: str | None = None, address: str | None = None, console: Console | None = None,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.out = out
        self.address = address
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.folder = RunFolder(out)
        state = self.folder.state()
        if storage is not None and has_password(storage):
            self.console.print(f"[yellow]warning:[/] a password in --storage is visible to every user of this "
                               f"host (process list); put it in {PASSWORD_ENV} or PGPASSFILE instead. It is not "
                               "stored.", soft_wrap=True, highlight=False)
        # Stored without its password (state.json): it comes from the environment again on resume.
        if state and storage is not None and strip_password(storage) != state.get("storage"):
            held = redact(state.get("storage") or "its journal file")
            raise ConfigError(f"{out} holds study '{state.get('study')}' on {held}; pass the same --storage "
                              "or another --out")
        if state and study is not None and study != state.get("study"):
            raise ConfigError(f"{out} holds study '{state.get('study')}', not '{study}'; pass the same "
                              "--study or another --out")
        self.storage_url: str | None = storage if storage is not None else state.get("storage")
        self.study_name: str = study or state.get("study") or cfg.name
        self.tracking_uri: str = tracking_uri or state.get("tracking_uri") or self.folder.default_tracking_uri()
        self.search_key: str = state.get("search_key") or uuid.uuid4().hex
        self.driver_id = uuid.uuid4().hex[:12]
        self.single = cfg.search.objective.mode == "single"
        self.can_prune = self.single and cfg.search.pruner_name != "none"
        # Under a particle-step budget Optuna's "step" (the pruner's resource) is particle-steps.
        self.compute_resource = cfg.search.objective.budget == "particle_steps"
        self.stop = threading.Event()
        self.live: dict[int, _Live] = {}
        self._resolved: dict[str, tuple[ScalingConfig, int]] = {}
        self._shipper = DataShipper()  # a dataset's arrays go to the object store once per search
        self._progress: Progress | None = None
        self._task_id: Any = None
        self._done_before = 0
        self._told: list[int] = []
        """Trials told since the last MLflow flush (their runs' ends are flushed per finished pack)."""
        self._told_now = 0
        self._hb_stop = threading.Event()
        self._state = {"search_key": self.search_key, "study": self.study_name, "storage": self.storage_url,
                       "tracking_uri": self.tracking_uri, "name": cfg.name}

    # ------------------------------------------------------------------ public
    def run(self) -> dict[str, Any]:
        out = self.out
        with self.folder.hold("mfsweep search"):
            self.folder.write_state(self._state)
            self.folder.write_config("search.yaml", dump(self.cfg))
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.storage = open_storage(self.storage_url, out, on_stale, heartbeat_s=HEARTBEAT_S, grace_s=GRACE_S)
            self.storage_desc = where = self.storage.desc
            try:
                self.study = optuna.create_study(
                    storage=self.storage.main, study_name=self.study_name, load_if_exists=True,
                    directions=["minimize"] if self.single else ["minimize", "minimize"])
                study_id = self.storage.main.get_study_id_from_name(self.study_name)
            except ValueError as err:  # an existing study with other directions
                raise ConfigError(f"study '{self.study_name}' on {where}: {err}; pick another --study"
                                  ) from None
            except Exception as err:
                raise StorageError(f"cannot open study '{self.study_name}' on {where}: "
                                   f"{str(err).strip().splitlines()[0][:200]}") from None
            self.book = TrialBook(self.study, self.storage, study_id, self.search_key, self.driver_id, self.console)
            self.study.sampler = make_sampler(self.cfg, len(self.study.get_trials(deepcopy=False)))
            self.study.pruner = make_pruner(self.cfg)
            try:
                return self._run()
            finally:
                self._hb_stop.set()
                close_tracker(getattr(self, "tracker", None), self.console)

    # ------------------------------------------------------------------ driver
    def _open_tracking(self) -> None:
        """Tracker (fails fast on an unreachable server), the study's parent run, the config artifact."""
        from .tracking import Tracker  # imported here: mlflow's import (~1.5 s) overlaps Ray's boot

        cfg = self.cfg
        self.tracker = Tracker(self.tracking_uri, cfg.name,
                               experiment_tags={mlflow_view.NOTE_TAG: mlflow_view.SEARCH_EXPERIMENT_NOTE})
        self.ledger = Ledger(self.tracker, self)
        base = cfg.base_raw()
        base.pop("execution")
        params = {**flatten(base), **flatten({"search": cfg.search.model_dump(mode="json")})}
        params.pop("search.trials")  # may grow on resume (MLflow params are immutable; it goes in a tag)
        params = {k: v for k, v in params.items() if not k.startswith("search.space")}
        params["search.space"] = json.dumps(cfg.search.model_dump(mode="json")["space"])[:6000]
        self.parent = self.tracker.start_parent(mlflow_view.parent_run_name(self.study_name, "search"), params, {
            **run_tags("search", self.search_key, self.out), "mfsweep.study": self.study_name,
            "mfsweep.storage": self.storage_desc, "mfsweep.trials": str(cfg.search.trials)})
        self.tracker.log_artifact(self.parent, self.out / "search.yaml")
        self.runs = TrialRuns(cfg, self.out, self.tracker, self.ledger, self.parent, self._resolve,
                              compute_resource=self.compute_resource, search_key=self.search_key)

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.book.recover()
        target = cfg.search.trials
        done, _, _ = budget_counts(self.study.get_trials(deepcopy=False))
        ex = cfg.execution
        if done < target or self._fidelity_todo() or self._reeval_todo():
            pool = open_pool(ex, self.address, [cfg.task], self._open_tracking)
        else:
            pool = None
            self._open_tracking()
        self.runs.sync(self.study)
        closer: threading.Thread | None = None
        if pool is not None:
            try:
                self.pool = pool
                if self.storage.heartbeat is not None:
                    keep_alive(self.storage.heartbeat, self._heartbeat_ids, self._hb_stop, HEARTBEAT_S)
                self.console.print(
                    f"[bold]{cfg.name}[/]: study '{self.study_name}' ({self.storage_desc}), {done}/{target} "
                    f"trials done, up to {cfg.search.parallel} in flight on {pool.n_workers} {pool.device} "
                    f"worker(s); MLflow {redact(self.tracking_uri)}", soft_wrap=True, highlight=False)
                progress = progress_bar(self.console, self.show_progress, "trials")
                with progress, stop_on_signals(self.stop):
                    self._progress = progress
                    self._task_id = progress.add_task("search", total=float(target), completed=done,
                                                      trials=f"{done}/{target}")
                    self._loop(target)
                    self._progress = None
                if cfg.search.reeval is not None:
                    self._reeval()
                if cfg.search.fidelity is not None:
                    self._fidelity()
            except BaseException:
                pool.close()
                raise
            closer = close_in_background(pool)  # while the plots render
        try:
            return self._finish()
        finally:
            if closer is not None:
                closer.join(timeout=60)

    def _loop(self, target: int) -> None:
        """Asynchronous ask/tell: every worker starts with a pack of trials; the moment a pack ends, its
        worker gets a pack of new trials, asked with everything told so far (no round waits for its slowest
        pack, and the sampler sees each result as soon as it exists)."""
        self._done_before, _, _ = budget_counts(self.study.get_trials(deepcopy=False))
        self._told_now = 0
        while True:
            if self.stop.is_set():
                raise self._interrupted()
            jobs: list[PackJob] = []
            for _ in range(self.pool.n_workers):
                new = self._next_jobs(target)
                if not new:
                    break
                jobs += new
            if not jobs:
                self._flush_told()
                return
            try:
                self.pool.run(jobs, self._on_event, self.stop,
                              on_done=lambda job, failure: self._on_pack_done(job, failure, target),
                              on_idle=lambda n: [j for _ in range(n) for j in self._next_jobs(target)])
            except WorkersLost as err:
                # Like an interrupt: trials cut short are retried with the same parameters on resume.
                self.stop.set()
                with contextlib.suppress(Interrupted):
                    self._settle()
                raise PoolError(f"{err}; resume with: mfsweep resume {self.out}") from None
            self._settle()

    def _next_jobs(self, target: int) -> list[PackJob]:
        """Packs for one worker's share of ``search.parallel`` new trials (none once the budget is asked for).
        Trials that cannot run (an invalid combination, too wide for a worker) are told FAIL at once and
        replaced."""
        while True:
            self.book.recover()
            done, running, _ = budget_counts(self.study.get_trials(deepcopy=False))
            # RUNNING trials include ours in flight and those of other live drivers sharing the study.
            per_pack = max(1, math.ceil(self.cfg.search.parallel / self.pool.n_workers))
            n = min(per_pack, target - done - running)
            if n <= 0:
                return []
            lives = [self._start_trial(self.book.ask()) for _ in range(n)]
            jobs = self._pack([lv for lv in lives if lv.fail_reason is None], tag=f"t{lives[0].number:06d}",
                              spread=False)
            for lv in lives:
                if lv.fail_reason is not None:
                    self._tell(lv)
            if jobs:
                return jobs

    def _on_pack_done(self, job: PackJob, failure: JobFailure | None, target: int) -> list[PackJob]:
        """A pack ended: tell its trials that have no result yet, then hand its worker new trials."""
        for sp in job.networks:
            lv = self.live.get(sp.net_id)
            if lv is None or lv.trial is None:
                continue
            if failure is not None and lv.retired is None:
                lv.fail_reason = f"pack failed: {failure.reason}"
            if self.stop.is_set() and lv.retired is None and lv.fail_reason is None and lv.prune_at is None:
                continue  # interrupted: retried by _settle
            self._tell(lv)
        self._flush_told()
        if self.stop.is_set():
            return []
        return self._next_jobs(target)

    def _settle(self) -> None:
        """After the pool returns: tell what is left; trials an interrupt cut short are failed and retried."""
        interrupted = []
        for lv in [lv for lv in self.live.values() if lv.trial is not None]:
            if self.stop.is_set() and lv.retired is None and lv.fail_reason is None and lv.prune_at is None:
                interrupted.append(lv)
                self.live.pop(lv.net_id, None)
            else:
                self._tell(lv)
        for lv in interrupted:
            why = f"driver interrupted at step {lv.last_step}; retried as a new trial"
            self.book.retry(self._frozen(lv.number), why)
            self.runs.end(lv.run_id, self._frozen(lv.number))
            self._told.append(lv.number)
        self._flush_told()
        if self.stop.is_set():
            raise self._interrupted()

    def _flush_told(self) -> None:
        if self._told:
            self.runs.mark_synced(self._told)
            self._told = []

    def _interrupted(self) -> Interrupted:
        self.tracker.flush()
        done, _, _ = budget_counts(self.study.get_trials(deepcopy=False))
        return Interrupted(f"interrupted with {done}/{self.cfg.search.trials} trials done; resume with: "
                           f"mfsweep resume {self.out}")

    # ------------------------------------------------------------------ trials
    def _frozen(self, number: int) -> FrozenTrial:
        t = self.study.get_trials(deepcopy=False)[number]  # numbers are list positions within a study
        assert t.number == number
        return t

    def _resolve(self, params: Mapping[str, Any], width: int | None = None) -> tuple[ScalingConfig, int]:
        key = json.dumps([params, width], sort_keys=True, default=str)
        hit = self._resolved.get(key)
        if hit is None:
            hit = self._resolved[key] = self.cfg.resolve(params, width)
        return hit

    def _start_trial(self, trial: Trial) -> _Live:
        params = suggest(trial, self.cfg.search.space)
        try:
            tcfg, width = self._resolve(params)
            reason = None
        except ConfigError as err:
            tcfg, width, reason = None, int(params.get(WIDTH, self.cfg.search.trial_width)), f"invalid: {err}"
        steps = tcfg.dynamics.steps if tcfg is not None else self.cfg.steps_for(width)
        trial.set_user_attr("width", width)
        trial.set_user_attr("steps", steps)
        run = self.runs.start(trial.number, params, width, steps, tcfg)
        lv = _Live(trial.number, trial.number, params, width, steps, run, trial=trial,
                   trial_id=self.book.trial_id(trial.number) if self.storage.heartbeat else None, cfg=tcfg,
                   fail_reason=reason)
        self.live[lv.net_id] = lv
        return lv

    def _heartbeat_ids(self) -> list[int]:
        return [lv.trial_id for lv in list(self.live.values()) if lv.trial_id is not None]

    def _spec(self, lv: _Live) -> NetworkSpec:
        assert lv.cfg is not None
        return network_spec(lv.cfg, lv.net_id, lv.width, self.cfg.search.seed if lv.seed is None else lv.seed)

    def _pack(self, lives: Sequence[_Live], tag: str, spread: bool = True,
              data_seed: int | None = None) -> list[PackJob]:
        """The planner's packs (:func:`plan.plan`) of ``lives``: with ``spread`` each group is split over the
        workers, else it stays one pack where it fits (one worker's share of an asynchronous search). A
        network too wide for a worker gets its fail reason and no pack."""
        by_id = {lv.net_id: lv for lv in lives}
        entries = []
        for lv in lives:
            assert lv.cfg is not None
            entries.append((lv.cfg, self._spec(lv)))
        # Pack ids are unique per search and round: a late retire request can never hit a later pack.
        packing = plan(entries, n_workers=self.pool.n_workers if spread else 1,
                       memory_bytes=self.pool.memory_bytes, execution=self.cfg.execution,
                       data_seed=self.cfg.search.seed if data_seed is None else data_seed,
                       pack_id=lambda i: f"{self.search_key[:8]}-{tag}-{i}")
        for spec, reason in packing.too_wide:
            by_id[spec.net_id].fail_reason = reason
        return [self._shipper.attach(j) for j in packing.jobs]

    def _on_event(self, ev: PackEvent) -> None:
        self.ledger.on_event(ev)
        self._advance()

    # ------------------------------------------------------------------ the ledger's policy
    def run_of(self, net_id: int) -> str | None:
        """A network in flight's MLflow run (a pruned one's late reports are dropped)."""
        lv = self.live.get(net_id)
        return None if lv is None or lv.prune_at is not None else lv.run_id

    def on_point(self, ev: PackEvent, m: NetMetrics, prev_step: int) -> None:
        """Report the point to the trial; ask the pruner, and retire the network from its pack if it says so."""
        lv = self.live[m.net_id]
        lv.last_step = m.step
        if not math.isfinite(m.test_loss):
            return
        lv.last_loss = m.test_loss
        if lv.trial is None or not self.single:
            return  # Optuna has no intermediate values for multi-objective studies
        lv.trial.report(m.test_loss, m.step * lv.width if self.compute_resource else m.step)
        if self.can_prune and 0 < m.step < lv.steps and lv.trial.should_prune():
            lv.prune_at = m.step
            self.pool.request_retire(ev.pack_id, m.net_id, NetStatus.PRUNED.value,
                                     f"pruned by {self.cfg.search.pruner_name} at step {m.step}")

    def on_end(self, r: Retired, ev: PackEvent) -> None:
        """A trial is told the moment its network ends (the sampler and pruner see it now, not when its pack
        ends); an extra stage's network is recorded when its stage ends."""
        lv = self.live.get(r.net_id)
        if lv is not None and lv.retired is None:
            lv.retired = r
            if lv.trial is not None:
                self._tell(lv)

    def _advance(self) -> None:
        if self._progress is None:
            return
        frac = sum(1.0 if lv.prune_at is not None else min(1.0, lv.steps_trained / max(1, lv.steps))
                   for lv in self.live.values() if lv.trial is not None)
        done = self._done_before + self._told_now
        self._progress.update(self._task_id, completed=done + frac, trials=f"{done}/{self.cfg.search.trials}")

    def _tell(self, lv: _Live) -> None:
        """Tell Optuna how the trial ended, then record it in MLflow."""
        assert lv.trial is not None
        r = lv.retired
        values: list[float] | None = None
        if lv.fail_reason is not None:
            state, reason = TrialState.FAIL, lv.fail_reason
        elif lv.prune_at is not None or (r is not None and r.status is NetStatus.PRUNED):
            state, reason = TrialState.PRUNED, f"pruned at step {lv.prune_at or (r.step if r else 0)}"
        elif r is None:
            state, reason = TrialState.FAIL, "the pool ended without a result for this network"
        elif r.status is NetStatus.FINISHED and r.result_loss is not None and math.isfinite(r.result_loss):
            # The objective is the final-window mean (not one draw from SGD's noise floor).
            state, reason = TrialState.COMPLETE, "completed"
            values = [r.result_loss] if self.single else [r.result_loss, float(lv.particle_steps)]
        else:
            state, reason = TrialState.FAIL, f"{r.status.value}: {r.reason}"
        trial = lv.trial
        trial.set_user_attr(PS_ATTR, lv.particle_steps)
        trial.set_user_attr("steps_trained", lv.steps_trained)
        trial.set_user_attr(REASON_ATTR, reason)
        frozen = self.study.tell(trial, values, state=state, skip_if_finished=True)
        self.runs.end(lv.run_id, frozen)
        self.live.pop(lv.net_id, None)
        self._told.append(lv.number)
        self._told_now += 1

    # ------------------------------------------------------------------ width as fidelity
    def _top(self, k: int | None = None) -> list[FrozenTrial]:
        return top(self.cfg, self.study, k)

    def _fidelity_todo(self) -> list[tuple[FrozenTrial, int]]:
        """(trial, width) pairs of the promotion stage not yet recorded in the study."""
        fid = self.cfg.search.fidelity
        if fid is None:
            return []
        have = self.study.user_attrs
        top = self._top()
        return [(t, w) for w in fid.widths[1:] for t in top if fidelity_key(w, t.number) not in have]

    def _fidelity(self) -> None:
        """Retrain the top_k complete trials at every larger width (no pruning); results go to the study's
        user attrs (so a resumed search only runs what is missing) and to MLflow child runs."""
        fid = self.cfg.search.fidelity
        assert fid is not None
        top = self._top()
        # Same parameters and training horizon as the trial, only wider (docs/science.md, width as a fidelity).
        lives = [self._stage_live(_PROMOTED_BASE + i, t, width, f"-w{width}", fidelity_key(width, t.number))
                 for i, (t, width) in enumerate(self._fidelity_todo())]
        if not lives:
            return
        self.console.print(f"width fidelity: retraining the best {len(top)} trials at widths "
                           f"{fid.widths[1:]} ({len(lives)} networks)", highlight=False)
        self._run_stage(lives, self._pack(lives, tag="fidelity"), "PROMOTED")

    def _stage_live(self, net_id: int, t: FrozenTrial, width: int | None, suffix: str, key: str,
                    seed: int | None = None) -> _Live:
        """An extra stage's network: trial ``t``'s parameters and training horizon (at ``width``, default the
        trial's), its own MLflow child run, its result stored under the study user attr ``key``."""
        tcfg, trial_width = self._resolve(t.params)
        width = trial_width if width is None else width
        steps = tcfg.dynamics.steps
        run = self.runs.start(t.number, t.params, width, steps, tcfg, suffix=suffix)
        return _Live(net_id, t.number, dict(t.params), width, steps, run, cfg=tcfg, seed=seed, key=key)

    def _run_stage(self, lives: Sequence[_Live], jobs: list[PackJob], state: str) -> None:
        """Train an extra stage's networks (no pruning); each result goes to the study's user attr
        ``lv.key`` (so a resumed search only runs what is missing) and to its MLflow child run."""
        for lv in lives:
            self.live[lv.net_id] = lv
        with stop_on_signals(self.stop):
            try:
                failures = self.pool.run(jobs, self._on_event, self.stop)
            except WorkersLost as err:  # nothing recorded: the stage runs again on resume
                self.tracker.flush()
                raise PoolError(f"{err}; resume with: mfsweep resume {self.out}") from None
        for f in failures:
            for sp in f.job.networks:
                lv = self.live[sp.net_id]
                lv.fail_reason = lv.fail_reason or f"pack failed: {f.reason}"
        for lv in lives:
            self.live.pop(lv.net_id, None)
            r = lv.retired
            if r is None and lv.fail_reason is None:
                continue  # interrupted: retrained on resume
            ok = r is not None and r.status is NetStatus.FINISHED and r.result_loss is not None \
                and math.isfinite(r.result_loss)
            rec = {"loss": r.result_loss if ok and r is not None else None,
                   "status": r.status.value if r is not None else "failed",
                   "reason": lv.fail_reason or (r.reason if r is not None else ""),
                   PS_ATTR: lv.particle_steps}
            self.study.set_user_attr(lv.key, rec)
            final = {PS_ATTR: float(lv.particle_steps)}
            if rec["loss"] is not None:
                final["final_test_loss"] = float(rec["loss"])
            self.ledger.close_run(lv.run_id, final, lv.steps_trained,
                                  {"optuna.state": state, "mfsweep.reason": str(rec["reason"])[:500],
                                   "mfsweep.trial_number": str(lv.number)}, "FINISHED" if ok else "FAILED")
        self.tracker.flush()
        if self.stop.is_set():
            raise self._interrupted()

    # ------------------------------------------------------------------ re-evaluation on fresh seeds
    def _reeval_seed(self, j: int) -> int:
        return reeval_seed(self.cfg, j)

    def _reeval_todo(self) -> list[tuple[FrozenTrial, int]]:
        rv = self.cfg.search.reeval
        if rv is None:
            return []
        have = self.study.user_attrs
        return [(t, j) for j in range(rv.seeds) for t in self._top(rv.top_k)
                if reeval_key(t.number, j) not in have]

    def _reeval(self) -> None:
        """Retrain the top_k complete trials on ``seeds`` fresh seeds each; one pack per seed (a seed fixes
        the data stream), so every trial sees the same fresh draws (a paired comparison)."""
        rv = self.cfg.search.reeval
        assert rv is not None
        lives = [self._stage_live(_REEVAL_BASE + i, t, None, f"-seed{self._reeval_seed(j)}",
                                  reeval_key(t.number, j), seed=self._reeval_seed(j))
                 for i, (t, j) in enumerate(self._reeval_todo())]
        if not lives:
            return
        self.console.print(f"re-evaluation: retraining the best {rv.top_k} trials on {rv.seeds} fresh seeds "
                           f"({len(lives)} networks)", highlight=False)
        jobs: list[PackJob] = []
        for seed in sorted({lv.seed for lv in lives if lv.seed is not None}):
            jobs += self._pack([lv for lv in lives if lv.seed == seed], tag=f"reeval-s{seed}", spread=False,
                               data_seed=seed)
        self._run_stage(lives, jobs, "REEVALUATED")

    def _finish(self) -> dict[str, Any]:
        self.runs.sync(self.study)
        return SearchReport(self.cfg, self.study, self.study_name, self.out, self.console, self.tracker,
                            self.parent, self.storage_desc, self.tracking_uri).finish()


# --------------------------------------------------------------------------- CLI entry points


def default_out(cfg: SearchConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _same_search(a: SearchConfig, b: SearchConfig) -> bool:
    """Equal up to what may change between sessions (the trial budget, where it runs)."""
    def strip(c: SearchConfig) -> dict[str, Any]:
        d = c.model_dump(mode="json")
        d.pop("execution")
        d["search"].pop("trials")
        return d

    return strip(a) == strip(b)


def _run(cfg: SearchConfig, out: Path, console: Console, **kw: Any) -> int:
    try:
        summary = SearchRun(cfg, out, console=console, **kw).run()
    except StorageError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True, highlight=False)
        return EXIT_SERVICE
    best = summary.get("best")
    if best is not None:
        console.print(f"best: {best['value']:.6g} with {best['params']}", soft_wrap=True, highlight=False)
    console.print(f"done: {out}/summary.json", soft_wrap=True, highlight=False)
    return 0


def run_search_cli(args: Any, console: Console, cfg: SearchConfig | None = None, out: Path | None = None) -> int:
    """``mfsweep search CONFIG ...``: a new search, or the continuation of the one in ``--out`` (``cfg`` and
    ``out``: already loaded and checked by the CLI)."""
    if cfg is None:
        direct: dict[str, Any] = {}
        if getattr(args, "device", None):
            direct["execution.device"] = args.device
        if getattr(args, "backend", None):
            direct["execution.backend"] = args.backend
        if getattr(args, "trials", None) is not None:
            direct["search.trials"] = args.trials
        cfg = load_search(args.config, args.overrides, **direct)
    out = out or args.out or default_out(cfg)
    old = out / "search.yaml"
    if old.exists():
        if not _same_search(load_search(old), cfg):
            raise ConfigError(f"{out} holds a different search; pick a new --out, or continue it with: "
                              f"mfsweep resume {out}")
        console.print(f"resuming {out}", highlight=False)
    elif (out / "config.yaml").exists():
        raise ConfigError(f"{out} holds a scaling sweep; pick a new --out")
    return _run(cfg, out, console, storage=args.storage, study=args.study, tracking_uri=args.tracking_uri,
                address=args.address, progress=not args.no_progress)


def resume_search(dir: Path, *, address: str | None = None, tracking_uri: str | None = None,
                  progress: bool = True, console: Console | None = None) -> int:
    """``mfsweep resume DIR`` for a search folder: continue with its saved config, study and storage."""
    console = console or Console(stderr=True)
    dir = Path(dir)
    if not (dir / "state.json").exists():
        raise ConfigError(f"{dir} has search.yaml but no state.json; start it again with mfsweep search")
    cfg = load_search(dir / "search.yaml")
    console.print(f"resuming {dir}", highlight=False)
    return _run(cfg, dir, console, tracking_uri=tracking_uri, address=address, progress=progress)
