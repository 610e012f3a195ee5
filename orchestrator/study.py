"""The Optuna side of ``mfsweep search``: the search space (``suggest``), sampler, pruner and storage (a
journal file in the output folder, or an RDB URL with a heartbeat handle), and :class:`TrialBook`: this
driver's trials in a study other drivers may share (marked when asked; failed and retried once when a dead
driver left them running)."""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, Trial, TrialState
from rich.console import Console

from workers.engine import derive_seed

from .credentials import PASSWORD_ENV, has_password, redact, storage_password
from .pool import is_infrastructure_reason
from .search_config import ParamConfig, SearchConfig

__all__ = ["DRIVER_ATTR", "KEY_ATTR", "REASON_ATTR", "RETRY_ATTR", "Storage", "StorageError", "TrialBook",
           "make_pruner", "make_sampler", "on_stale", "open_storage", "quiet", "suggest"]

KEY_ATTR = "mfsweep.search_key"
"""Trial user attr: the search (output folder) the trial belongs to."""
DRIVER_ATTR = "mfsweep.driver"
"""Trial user attr: the driver process that asked it."""
RETRY_ATTR = "mfsweep.retry_of"
"""Trial user attr: the number of the trial this one retries."""
REASON_ATTR = "mfsweep.reason"
"""Trial user attr: why the trial ended as it did."""


class StorageError(RuntimeError):
    """The Optuna storage cannot be used (one line naming the fix)."""


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def make_sampler(cfg: SearchConfig, n_existing: int) -> optuna.samplers.BaseSampler:
    s = cfg.search.sampler
    # Reseed on resume: the same seed would replay the first session's random draws.
    seed = s.seed if n_existing == 0 else derive_seed(s.seed, n_existing) % (2**32)
    startup: dict[str, Any] = {} if s.n_startup_trials is None else {"n_startup_trials": s.n_startup_trials}
    with quiet():
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


def open_storage(url: str | None, out: Path, on_stale: Callable[[optuna.Study, FrozenTrial], None], *,
                 heartbeat_s: int, grace_s: int) -> Storage:
    """The journal file in ``out`` by default, else an RDB URL (with a heartbeat handle: a beat every
    ``heartbeat_s``, a trial stale after ``grace_s`` without one)."""
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
        with quiet():
            heartbeat = optuna.storages.RDBStorage(
                url, engine_kwargs=engine, heartbeat_interval=heartbeat_s,
                grace_period=grace_s, heartbeat_stale_trial_callback=on_stale)
    except Exception as err:  # sqlalchemy errors, missing drivers, bad URLs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if password is not None:
            first = first.replace(password, "***")
        raise StorageError(f"cannot open Optuna storage {redact(url)}: {redact(first)[:200]}; check --storage "
                           f"(e.g. postgresql://user@host/db, with the password in {PASSWORD_ENV}, PGPASSWORD "
                           "or PGPASSFILE) or omit it for a journal file") from None
    return Storage(main, redact(url), heartbeat)


def keep_alive(storage: optuna.storages.RDBStorage, trial_ids: Callable[[], Iterable[int]],
               stop: threading.Event, every_s: float) -> None:
    """Record a heartbeat of ``trial_ids()`` (this driver's running trials) every ``every_s`` seconds until
    ``stop``, so that other drivers sharing an RDB study do not fail them as stale."""

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a missed beat (or a racing dict) retries next interval
                for trial_id in trial_ids():
                    storage.record_heartbeat(trial_id)

    threading.Thread(target=beat, name="mfsweep-optuna-heartbeat", daemon=True).start()


def on_stale(study: optuna.Study, t: FrozenTrial) -> None:
    """Heartbeat-stale trial (already FAIL): enqueue its retry once."""
    if not any(tt.user_attrs.get(RETRY_ATTR) == t.number for tt in study.get_trials(deepcopy=False)):
        study.enqueue_trial(dict(t.params), user_attrs={RETRY_ATTR: t.number,
                                                        "mfsweep.retry_reason": "heartbeat stale"})


@dataclass
class TrialBook:
    """This driver's trials in ``study``. Invariants: every trial it asks carries the search key and this
    driver's id from the moment it exists; a trial of this search that a dead driver left RUNNING is failed
    with a reason and retried exactly once with the same parameters."""

    study: optuna.Study
    storage: Storage
    study_id: int
    search_key: str
    driver_id: str
    console: Console
    _infra_checked: bool = False

    def ask(self) -> Trial:
        """A RUNNING trial marked as this driver's. A plain ask() would leave a window in which a killed
        driver leaves a RUNNING trial nobody can attribute; so the trial is enqueued with our marks first
        and ask() pops the oldest WAITING trial (ours, or a retry, which carries the search key too)."""
        if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            self.study.enqueue_trial({}, user_attrs={KEY_ATTR: self.search_key, DRIVER_ATTR: self.driver_id})
        trial = self.study.ask()
        trial.set_user_attr(KEY_ATTR, self.search_key)
        trial.set_user_attr(DRIVER_ATTR, self.driver_id)
        return trial

    def trial_id(self, number: int) -> int:
        """The storage's id of trial ``number`` (heartbeats and user attrs of trials not asked here)."""
        return self.storage.main.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def retry(self, t: FrozenTrial, reason: str) -> None:
        """Fail a trial that will never be told and enqueue its parameters once (idempotent: a driver killed
        half-way through this is recovered by the next start)."""
        trials = self.study.get_trials(deepcopy=False)
        if not any(tt.user_attrs.get(RETRY_ATTR) == t.number for tt in trials):
            marks = {RETRY_ATTR: t.number, KEY_ATTR: self.search_key}
            self.study.enqueue_trial(dict(t.params), user_attrs=marks)
        if t.state == TrialState.RUNNING:
            # The public Trial API needs the live object of the process that asked; the storage takes ids.
            self.storage.main.set_trial_user_attr(self.trial_id(t.number), REASON_ATTR, reason)
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)

    def recover(self) -> None:
        """Fail and retry the trials of this search that a dead driver left RUNNING (and, with a heartbeat
        storage, stale trials of any driver)."""
        if self.storage.heartbeat is not None:
            with quiet():
                optuna.storages.fail_stale_trials(
                    optuna.load_study(study_name=self.study.study_name, storage=self.storage.heartbeat))
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            ours = t.user_attrs.get(KEY_ATTR) == self.search_key
            if ours and t.user_attrs.get(DRIVER_ATTR) != self.driver_id:
                self.retry(t, f"driver {t.user_attrs.get(DRIVER_ATTR)} stopped before the trial ended "
                              "(killed or crashed); retried as a new trial")
                self.console.print(f"trial {t.number} was left running by a dead driver: failed and retried",
                                   highlight=False)
        if not self._infra_checked:
            # Earlier versions failed trials whose workers were lost; such a loss is not the trial's result.
            self._infra_checked = True
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
                if t.user_attrs.get(KEY_ATTR) == self.search_key and \
                        is_infrastructure_reason(str(t.user_attrs.get(REASON_ATTR, ""))):
                    self.retry(t, str(t.user_attrs.get(REASON_ATTR)))
