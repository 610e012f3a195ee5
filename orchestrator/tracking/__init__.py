"""Batched, non-blocking MLflow logging for sweeps of thousands of networks.

This is the only package of the project that imports mlflow (besides :mod:`orchestrator.libcompat`'s lazy
imports). Where a call goes, in the order a report travels:

    tracker.py   Tracker: the drivers' one object (start_parent/start_child, log_*, end_run, flush, close)
    runs.py      run identity and resume: which run is which sweep / network, what a reused run holds
    writer.py    the queue and its writer thread: groups calls into write cycles, retries with backoff
    stores.py    the Store protocol and two back-ends: ClientStore (MlflowClient), RestStore (tracking server:
                 runs created by the writer behind session-local handles, per-run requests 4 at a time)
    sqlstore.py  BulkSqlStore: guarded bulk SQL into SQLite/PostgreSQL stores (runs, tags, params, points,
                 ends), checked against the store's schema revision and tables
    pgcopy.py    PostgreSQL COPY through the driver's copy API (psycopg 3, psycopg2) inside a transaction
    common.py    the queued operations, write segments and steps, counters, error and name rules
"""

from ..errors import TrackingError
from .common import (
    CHILD_KEY_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    PARENT_TAG,
    SWEEP_KEY_TAG,
    TrackerStats,
    metric_name_error,
)
from .sqlstore import TESTED_SCHEMA_REVISIONS
from .tracker import Tracker

__all__ = ["CHILD_KEY_TAG", "EXPERIMENT_KIND_TAG", "MODEL_TRAINING_KIND", "PARENT_TAG", "SWEEP_KEY_TAG",
           "TESTED_SCHEMA_REVISIONS", "Tracker", "TrackerStats", "TrackingError", "metric_name_error"]
