"""``mfsweep search``: Optuna search over architectures and dynamics, trained packed on the worker pool.

This is the only module of the project that imports optuna.

Execution (asynchronous ask/tell): every worker trains a pack of ``ceil(search.parallel / workers)`` trials;
each trial's parameters are applied to the base config, compatible networks share a pack (same pack key:
task, unit, dynamics schedule, dtype; per-network lr, parametrization, temperature, birth-death rate/scheme
and width differ freely inside a pack). Every report's test loss reaches ``trial.report``; a trial the
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
import os
import re
import statistics
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from workers.engine import NetMetrics, NetStatus, NetworkSpec, Retired, derive_seed
from workers.jobs import PackEvent, PackJob

from . import mlflow_view
from .config import ConfigError, ScalingConfig, dump, load
from .credentials import PASSWORD_ENV, has_password, redact, storage_password, strip_password
from .driver import Interrupted, close_tracker, open_pool, progress_bar, run_tags
from .ledger import Ledger
from .plan import network_settings, plan
from .plan import network_spec as plan_network_spec
from .pool import (
    JobFailure,
    PoolError,
    WorkersLost,
    close_in_background,
    is_infrastructure_reason,
)
from .runfolder import RunFolder
from .runmeta import flatten, stop_on_signals
from .search_config import WIDTH, ParamConfig, SearchConfig, load_search
from .userdata import DataShipper

__all__ = ["SearchRun", "StorageError", "network_spec", "resume_search", "run_search_cli", "suggest"]

EXIT_SERVICE = 3
KEY_ATTR = "mfsweep.search_key"
DRIVER_ATTR = "mfsweep.driver"
RETRY_ATTR = "mfsweep.retry_of"
REASON_ATTR = "mfsweep.reason"
PS_ATTR = "particle_steps"
FIDELITY_PREFIX = "mfsweep.fidelity"
HEARTBEAT_S = 10
GRACE_S = 60
# Promoted (fidelity) networks need ids that never collide with trial numbers inside a pack.
_PROMOTED_BASE = 1 << 40
_REEVAL_BASE = 1 << 41
REEVAL_PREFIX = "mfsweep.reeval"


class StorageError(RuntimeError):
    """The Optuna storage cannot be used (one line naming the fix)."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Optuna marks heartbeats, matplotlib plots and multivariate TPE experimental: not news to a user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


# --------------------------------------------------------------------------- space, sampler, pruner


def suggest(trial: Trial, space: Mapping[str, ParamConfig]) -> dict[str, Any]:
    """Suggest every active parameter in order; a parameter whose ``when`` fails is not suggested (the
    base config's value applies)."""
    params: dict[str, Any] = {}
    for key, p in space.items():
        if not all(c.holds(params) for c in p.conditions()):
            continue
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, list(p.choices or []))
        elif p.type == "int":
            assert p.low is not None and p.high is not None
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            assert p.low is not None and p.high is not None
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


def network_spec(tcfg: ScalingConfig, net_id: int, width: int, seed: int) -> NetworkSpec:
    """A trial's network: its resolved config's per-network settings, initialised from ``seed``."""
    return plan_network_spec(tcfg, net_id, width, derive_seed(seed, 0))


def make_sampler(cfg: SearchConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    s = cfg.search.sampler
    # Reseed on resume: the same seed would replay the first session's random draws.
    seed = s.seed if n_existing == 0 else derive_seed(s.seed, n_existing) % (2**32)
    startup: dict[str, Any] = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
    with _quiet():
        if s.name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                              constant_liar=s.constant_liar,
                                              **startup)
        if s.name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False, **startup)
        if s.name == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False, **startup)
        if s.name == "nsga2":
            pop = s.population_size or max(8, cfg.search.parallel)
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=pop)
        return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(cfg: SearchConfig) -> optuna.pruners.BasePruner:
    """The pruner; its resource is the step, or the particle-steps under a particle-step budget (trials of
    different widths then meet at the same compute, not at the same step)."""
    p = cfg.search.pruner
    obj = cfg.search.objective
    if obj.budget == "particle_steps":
        assert obj.particle_steps is not None
        steps = obj.particle_steps
        min_resource = p.min_resource or max(1, steps // (p.reduction_factor ** 2))
    else:
        base, _ = cfg.resolve({})
        steps, every = base.dynamics.steps, base.dynamics.eval_every
        min_resource = p.min_resource or max(every, steps // (p.reduction_factor ** 2))
    name = cfg.search.pruner_name
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_resource,
                                                      reduction_factor=p.reduction_factor)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, max_resource=steps,
                                              reduction_factor=p.reduction_factor)
    if name == "median":
        warm = p.n_warmup_steps if p.n_warmup_steps is not None else steps // 5
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=warm)
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------- storage


def _repair_journal(path: Path) -> None:
    """Drop a torn last line (a driver killed mid-write); the next append would make it unreadable."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


@dataclass(frozen=True)
class Storage:
    """The Optuna storage a search uses, kept as constructed (Optuna's Study does not expose its storage)."""

    main: optuna.storages.BaseStorage
    """The study's storage: ask, tell, user attributes by trial id."""
    desc: str
    """Where it is, password-free (for messages and tags)."""
    heartbeat: optuna.storages.RDBStorage | None = None
    """RDB URLs: a second handle on the same database with Optuna's heartbeat (``record_heartbeat``, and
    ``fail_stale_trials`` on a study loaded through it). The study itself runs on ``main``, without
    heartbeat: Optuna warns at every ``ask()`` outside ``optimize()`` on a heartbeat storage, and this driver
    records heartbeats itself."""


def open_storage(url: str | None, out: Path, on_stale: Callable[[optuna.Study, FrozenTrial], None]) -> Storage:
    """The journal file in ``out`` by default, else an RDB URL (with a heartbeat handle)."""
    if url is None or url.startswith("journal:") or not re.match(r"^[a-z][a-z0-9+]*://", url):
        path = out / "optuna.journal" if url is None else Path(url.removeprefix("journal:"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _repair_journal(path)
            # Only this driver (it holds the output folder's lock) writes here: a lock file left by a
            # killed driver is stale, and waiting out Optuna's 30 s grace period would only delay resume.
            lock = Path(str(path) + ".lock")
            if url is None and lock.is_symlink():
                lock.unlink()
            backend = JournalFileBackend(str(path))
            return Storage(optuna.storages.JournalStorage(backend), f"journal file {path}")
        except OSError as err:
            raise StorageError(f"cannot use journal file {path}: {err.strerror}; pass a writable --out or "
                               "--storage") from None
    engine: dict[str, Any] = {"pool_pre_ping": True}
    password = storage_password()
    if password is not None and not has_password(url):
        # Handed to the database driver, never put into a URL that could be printed or stored.
        engine["connect_args"] = {"password": password}
    try:
        main = optuna.storages.RDBStorage(url, engine_kwargs=engine)
        with _quiet():
            heartbeat = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S, heartbeat_stale_trial_callback=on_stale)
    except Exception as err:  # sqlalchemy errors, missing drivers, bad URLs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if password is not None:
            first = first.replace(password, "***")
        raise StorageError(f"cannot open Optuna storage {redact(url)}: {redact(first)[:200]}; check --storage "
                           f"(e.g. postgresql://user@host/db, with the password in {PASSWORD_ENV}, PGPASSWORD "
                           "or PGPASSFILE) or omit it for a journal file") from None
    return Storage(main, redact(url), heartbeat)


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
    curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def steps_trained(self) -> int:
        if self.retired is not None:
            return self.retired.step
        return self.last_step

    @property
    def particle_steps(self) -> int:
        return self.width * self.steps_trained


def _budget_counts(trials: Sequence[FrozenTrial]) -> tuple[int, int, set[int]]:
    """(finished trials that count toward the budget, RUNNING trials, numbers of trials that were retried)."""
    retried = {int(t.user_attrs[RETRY_ATTR]) for t in trials if RETRY_ATTR in t.user_attrs}
    done = sum(1 for t in trials if t.state.is_finished()
               and not (t.state == TrialState.FAIL and t.number in retried))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return done, running, retried


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
        self._infra_checked = False
        self._state = {"search_key": self.search_key, "study": self.study_name, "storage": self.storage_url,
                       "tracking_uri": self.tracking_uri, "name": cfg.name}

    # ------------------------------------------------------------------ public
    def run(self) -> dict[str, Any]:
        out = self.out
        with self.folder.hold("mfsweep search"):
            self.folder.write_state(self._state)
            self.folder.write_config("search.yaml", dump(self.cfg))
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self.storage = open_storage(self.storage_url, out, self._on_stale)
            self.storage_desc = where = self.storage.desc
            try:
                self.study = optuna.create_study(
                    storage=self.storage.main, study_name=self.study_name, load_if_exists=True,
                    directions=["minimize"] if self.single else ["minimize", "minimize"])
                self.study_id = self.storage.main.get_study_id_from_name(self.study_name)
            except ValueError as err:  # an existing study with other directions
                raise ConfigError(f"study '{self.study_name}' on {where}: {err}; pick another --study"
                                  ) from None
            except Exception as err:
                raise StorageError(f"cannot open study '{self.study_name}' on {where}: "
                                   f"{str(err).strip().splitlines()[0][:200]}") from None
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

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._recover()
        target = cfg.search.trials
        done, _, _ = _budget_counts(self.study.get_trials(deepcopy=False))
        ex = cfg.execution
        if done < target or self._fidelity_todo() or self._reeval_todo():
            pool = open_pool(ex, self.address, [cfg.task], self._open_tracking)
        else:
            pool = None
            self._open_tracking()
        self._sync_mlflow()
        closer: threading.Thread | None = None
        if pool is not None:
            try:
                self.pool = pool
                self._heartbeat_thread()
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
        self._done_before, _, _ = _budget_counts(self.study.get_trials(deepcopy=False))
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
            self._recover()
            done, running, _ = _budget_counts(self.study.get_trials(deepcopy=False))
            # RUNNING trials include ours in flight and those of other live drivers sharing the study.
            per_pack = max(1, math.ceil(self.cfg.search.parallel / self.pool.n_workers))
            n = min(per_pack, target - done - running)
            if n <= 0:
                return []
            lives = [self._start_trial(self._ask()) for _ in range(n)]
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
            self._retry(self._frozen(lv.number), why)
            self._log_end(lv.run_id, self._frozen(lv.number))
            self._told.append(lv.number)
        self._flush_told()
        if self.stop.is_set():
            raise self._interrupted()

    def _flush_told(self) -> None:
        if self._told:
            self._flush_synced(self._told)
            self._told = []

    def _interrupted(self) -> Interrupted:
        self.tracker.flush()
        done, _, _ = _budget_counts(self.study.get_trials(deepcopy=False))
        return Interrupted(f"interrupted with {done}/{self.cfg.search.trials} trials done; resume with: "
                           f"mfsweep resume {self.out}")

    def _ask(self) -> Trial:
        """A RUNNING trial marked as this driver's. A plain ask() would leave a window in which a killed
        driver leaves a RUNNING trial nobody can attribute; so the trial is enqueued with our marks first
        and ask() pops the oldest WAITING trial (ours, or a retry, which carries the search key too)."""
        if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.enqueue_trial({}, user_attrs={KEY_ATTR: self.search_key, DRIVER_ATTR: self.driver_id})
        trial = self.study.ask()
        trial.set_user_attr(KEY_ATTR, self.search_key)
        trial.set_user_attr(DRIVER_ATTR, self.driver_id)
        return trial

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
        run = self._child(trial.number, params, width, steps, tcfg)
        lv = _Live(trial.number, trial.number, params, width, steps, run, trial=trial,
                   trial_id=self._trial_id(trial.number) if self.storage.heartbeat else None, cfg=tcfg,
                   fail_reason=reason)
        self.live[lv.net_id] = lv
        return lv

    def _child(self, number: int, params: Mapping[str, Any], width: int, steps: int,
               tcfg: ScalingConfig | None, suffix: str = "") -> str:
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
        lv.curve.append((m.step, m.test_loss))
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
        self._log_end(lv.run_id, frozen)
        self.live.pop(lv.net_id, None)
        self._told.append(lv.number)
        self._told_now += 1

    # ------------------------------------------------------------------ recovery
    def _retry(self, t: FrozenTrial, reason: str) -> None:
        """Fail a trial that will never be told and enqueue its parameters once (idempotent: a driver killed
        half-way through this is recovered by the next start)."""
        trials = self.study.get_trials(deepcopy=False)
        if not any(tt.user_attrs.get(RETRY_ATTR) == t.number for tt in trials):
            marks = {RETRY_ATTR: t.number, KEY_ATTR: self.search_key}
            self.study.enqueue_trial(dict(t.params), user_attrs=marks)
        if t.state == TrialState.RUNNING:
            # The public Trial API needs the live object of the process that asked; the storage takes ids.
            self.storage.main.set_trial_user_attr(self._trial_id(t.number), REASON_ATTR, reason)
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def _recover(self) -> None:
        """Fail and retry the trials of this search that a dead driver left RUNNING (and, with a heartbeat
        storage, stale trials of any driver)."""
        if self.storage.heartbeat is not None:
            with _quiet():
                optuna.storages.fail_stale_trials(
                    optuna.load_study(study_name=self.study_name, storage=self.storage.heartbeat))
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            ours = t.user_attrs.get(KEY_ATTR) == self.search_key
            if ours and t.user_attrs.get(DRIVER_ATTR) != self.driver_id:
                self._retry(t, f"driver {t.user_attrs.get(DRIVER_ATTR)} stopped before the trial ended "
                               "(killed or crashed); retried as a new trial")
                self.console.print(f"trial {t.number} was left running by a dead driver: failed and retried",
                                   highlight=False)
        if not self._infra_checked:
            # Earlier versions failed trials whose workers were lost; such a loss is not the trial's result.
            self._infra_checked = True
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
                if t.user_attrs.get(KEY_ATTR) == self.search_key and \
                        is_infrastructure_reason(str(t.user_attrs.get(REASON_ATTR, ""))):
                    self._retry(t, str(t.user_attrs.get(REASON_ATTR)))

    def _on_stale(self, study: optuna.Study, t: FrozenTrial) -> None:
        """Heartbeat-stale trial (already FAIL): enqueue its retry once."""
        if not any(tt.user_attrs.get(RETRY_ATTR) == t.number for tt in study.get_trials(deepcopy=False)):
            study.enqueue_trial(dict(t.params), user_attrs={RETRY_ATTR: t.number,
                                                            "mfsweep.retry_reason": "heartbeat stale"})

    def _trial_id(self, number: int) -> int:
        return self.storage.main.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _heartbeat_thread(self) -> None:
        """Record heartbeats of this driver's running trials (RDB storages), so that other drivers sharing the
        study do not fail them as stale."""
        storage = self.storage.heartbeat
        if storage is None:
            return

        def beat() -> None:
            while not self._hb_stop.wait(HEARTBEAT_S):
                with contextlib.suppress(Exception):  # a missed beat (or a racing dict) retries next interval
                    for trial_id in [lv.trial_id for lv in list(self.live.values()) if lv.trial_id is not None]:
                        storage.record_heartbeat(trial_id)

        threading.Thread(target=beat, name="mfsweep-optuna-heartbeat", daemon=True).start()

    # ------------------------------------------------------------------ MLflow
    def _log_end(self, run_id: str, t: FrozenTrial) -> None:
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

    def _synced_path(self) -> Path:
        return self.out / "mlflow_synced.json"

    def _synced(self) -> set[int]:
        p = self._synced_path()
        return set(json.loads(p.read_text())) if p.exists() else set()

    def _flush_synced(self, numbers: Sequence[int]) -> None:
        self.tracker.flush()  # the runs' ends are stored before we say so
        synced = self._synced() | set(numbers)
        tmp = self._synced_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(synced)))
        os.replace(tmp, self._synced_path())

    def _sync_mlflow(self) -> None:
        """Give every finished trial of this search a final MLflow child run (trials a killed driver told, or
        failed on recovery, may lack one)."""
        synced = self._synced()
        todo = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()
                and t.number not in synced and t.user_attrs.get(KEY_ATTR) == self.search_key]
        for t in todo:
            width = int(t.user_attrs.get("width", self.cfg.search.trial_width))
            steps = int(t.user_attrs.get("steps", self.cfg.steps_for(width)))
            try:
                tcfg: ScalingConfig | None = self._resolve(t.params)[0]
            except ConfigError:
                tcfg = None
            run = self._child(t.number, t.params, width, steps, tcfg)
            for step, v in sorted(t.intermediate_values.items()):
                at = step // width if self.compute_resource else step  # Optuna's step may be particle-steps
                self.tracker.log_metrics(run, {"test_loss": v}, at)
            self._log_end(run, t)
        if todo:
            self._flush_synced([t.number for t in todo])

    # ------------------------------------------------------------------ width as fidelity
    def _fidelity_key(self, width: int, number: int) -> str:
        return f"{FIDELITY_PREFIX}.w{width:06d}.t{number:06d}"

    def _top(self, k: int | None = None) -> list[FrozenTrial]:
        """The k (default: fidelity.top_k) best complete trials by their single-run value."""
        if k is None:
            assert self.cfg.search.fidelity is not None
            k = self.cfg.search.fidelity.top_k
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return sorted(complete, key=lambda t: (t.values[0], t.number))[:k]

    def _fidelity_todo(self) -> list[tuple[FrozenTrial, int]]:
        """(trial, width) pairs of the promotion stage not yet recorded in the study."""
        fid = self.cfg.search.fidelity
        if fid is None:
            return []
        have = self.study.user_attrs
        top = self._top()
        return [(t, w) for w in fid.widths[1:] for t in top if self._fidelity_key(w, t.number) not in have]

    def _fidelity(self) -> None:
        """Retrain the top_k complete trials at every larger width (no pruning); results go to the study's
        user attrs (so a resumed search only runs what is missing) and to MLflow child runs."""
        fid = self.cfg.search.fidelity
        assert fid is not None
        top = self._top()
        # Same parameters and training horizon as the trial, only wider (docs/science.md, width as a fidelity).
        lives = [self._stage_live(_PROMOTED_BASE + i, t, width, f"-w{width}", self._fidelity_key(width, t.number))
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
        run = self._child(t.number, t.params, width, steps, tcfg, suffix=suffix)
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
    def _reeval_key(self, number: int, j: int) -> str:
        return f"{REEVAL_PREFIX}.t{number:06d}.s{j}"

    def _reeval_seed(self, j: int) -> int:
        """Fresh seeds: never the search's own (its draws are the ones the pick was lucky on)."""
        return self.cfg.search.seed + 1 + j

    def _reeval_todo(self) -> list[tuple[FrozenTrial, int]]:
        rv = self.cfg.search.reeval
        if rv is None:
            return []
        have = self.study.user_attrs
        return [(t, j) for j in range(rv.seeds) for t in self._top(rv.top_k)
                if self._reeval_key(t.number, j) not in have]

    def _reeval(self) -> None:
        """Retrain the top_k complete trials on ``seeds`` fresh seeds each; one pack per seed (a seed fixes
        the data stream), so every trial sees the same fresh draws (a paired comparison)."""
        rv = self.cfg.search.reeval
        assert rv is not None
        lives = [self._stage_live(_REEVAL_BASE + i, t, None, f"-seed{self._reeval_seed(j)}",
                                  self._reeval_key(t.number, j), seed=self._reeval_seed(j))
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

    def _reeval_report(self) -> dict[str, Any] | None:
        rv = self.cfg.search.reeval
        if rv is None:
            return None
        attrs = self.study.user_attrs
        rows: list[dict[str, Any]] = []
        for t in self._top(rv.top_k):
            recs = [attrs.get(self._reeval_key(t.number, j)) for j in range(rv.seeds)]
            losses = [None if r is None else r.get("loss") for r in recs]
            got = [v for v in losses if v is not None]
            mean = statistics.fmean(got) if len(got) == rv.seeds else None
            se = statistics.stdev(got) / math.sqrt(len(got)) if mean is not None else None
            rows.append({"number": t.number, "params": t.params, "single_run": t.values[0],
                         "seeds": [self._reeval_seed(j) for j in range(rv.seeds)], "losses": losses,
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
        for t in self._top():
            losses: dict[str, float | None] = {str(fid.widths[0]): float(t.value or math.nan)}
            for w in fid.widths[1:]:
                rec = attrs.get(self._fidelity_key(w, t.number))
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
                with _quiet(), warnings.catch_warnings():
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

    def _finish(self) -> dict[str, Any]:
        self._sync_mlflow()
        trials = self.study.get_trials(deepcopy=False)
        states = {s: sum(1 for t in trials if t.state.name == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
        _, _, retried = _budget_counts(trials)
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
