"""The few places mfsweep relies on more than the documented API of Ray and MLflow, kept in one module.

Everything else in the project uses public API only. Each entry here says why no public way exists, and
``tests/orchestrator/test_libcompat.py`` fails with a message naming the entry when a library changes it.
MLflow's helpers are imported inside the functions: a rename in MLflow breaks the call that needs it (with
:class:`LibraryChanged`), never ``import orchestrator.tracking``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------- Ray

RAY_WORKER_NICENESS_ENV = "RAY_worker_niceness"
"""Ray reads every system-config entry from a ``RAY_<name>`` variable of the processes it starts (the
mechanism its docs use for e.g. ``RAY_memory_usage_threshold``); ``worker_niceness`` itself is not
documented and has no public ``ray.init`` argument. Ray's own job manager sets this variable to 0 for job
drivers."""
RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
"""A new local cluster turns token authentication on and warns at every start that it did. The documented
way to silence it (``RAY_AUTH_MODE=token``) only works if set before ``import ray`` (Ray caches its config at
import), which would also apply to clusters we merely connect to. Only this logger's level is changed."""


class LibraryChanged(RuntimeError):
    """A library no longer has what this module relies on (one line naming it and the supported range)."""


@contextlib.contextmanager
def local_ray_env() -> Iterator[None]:
    """Around ``ray.init`` of a local cluster this driver starts (its GCS and raylet inherit the driver's
    environment): run workers at the driver's priority instead of nice 15 (on a machine shared with another
    busy process they got ~3% of a core: a search ran 12x slower beside one study.optimize), and keep token
    authentication on (deploy/README.md, SECURITY) without its start-up warning. Both are undone after."""
    before = os.environ.get(RAY_WORKER_NICENESS_ENV)
    os.environ[RAY_WORKER_NICENESS_ENV] = "0"
    auth_log = logging.getLogger(RAY_AUTH_LOGGER)
    level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        auth_log.setLevel(level)
        if before is None:
            os.environ.pop(RAY_WORKER_NICENESS_ENV, None)
        else:
            os.environ[RAY_WORKER_NICENESS_ENV] = before


# ------------------------------------------------------------------------------------------- MLflow
# The REST calls go through MLflow's own request code (credentials from MLFLOW_TRACKING_TOKEN/USERNAME/
# PASSWORD, TLS settings, auth plugins) but without MlflowClient's multi-minute retry loop, which would
# hide a restarted server for minutes: the tracker retries with its own backoff. MLflow has no public
# client call with retries off.

MLFLOW_SUPPORTED = "mlflow>=3.0,<3.18"


def _mlflow(what: str) -> dict[str, Any]:
    """The MLflow helpers the REST path uses, looked up on first use."""
    try:
        from mlflow.protos import service_pb2
        from mlflow.utils import credentials, proto_json_utils, rest_utils
        return {"request": rest_utils.http_request, "verify": rest_utils.verify_rest_response,
                "creds": credentials.get_default_host_creds, "to_json": proto_json_utils.message_to_json,
                "LogBatch": service_pb2.LogBatch, "UpdateRun": service_pb2.UpdateRun,
                "CreateRun": service_pb2.CreateRun,
                "RunStatus": service_pb2.RunStatus}
    except (ImportError, AttributeError) as err:
        raise LibraryChanged(f"MLflow's REST helpers are gone ({err}), needed for {what}; install "
                             f"{MLFLOW_SUPPORTED!r}") from None


def mlflow_request(tracking_uri: str, endpoint: str, body: Mapping[str, Any], *, timeout: float,
                   check: bool = True) -> Any:
    """POST ``body`` to a tracking server's REST ``endpoint`` once (no retries); with ``check``, an error
    answer raises MLflow's ``RestException``/``MlflowException``. Returns the ``requests`` response."""
    m = _mlflow(endpoint)
    resp = m["request"](m["creds"](tracking_uri), endpoint, "POST", max_retries=0, timeout=timeout, json=dict(body))
    if check:
        m["verify"](resp, endpoint)
    return resp


def log_batch_body(run_id: str, metrics: Sequence[Any], params: Sequence[Any], tags: Sequence[Any]) -> dict:
    """The documented ``runs/log-batch`` JSON body of MLflow entities (NaN and infinities as MLflow's
    protobuf JSON encodes them)."""
    m = _mlflow("runs/log-batch")
    msg = m["LogBatch"](run_id=run_id, metrics=[x.to_proto() for x in metrics],
                        params=[x.to_proto() for x in params], tags=[x.to_proto() for x in tags])
    return dict(json.loads(m["to_json"](msg)))


def create_run_body(experiment_id: str, user_id: str, start_time_ms: int, tags: Sequence[Any],
                    run_name: str) -> dict:
    """The documented ``runs/create`` JSON body (what ``MlflowClient.create_run`` sends)."""
    m = _mlflow("runs/create")
    msg = m["CreateRun"](experiment_id=str(experiment_id), user_id=user_id, start_time=start_time_ms,
                         tags=[x.to_proto() for x in tags], run_name=run_name)
    return dict(json.loads(m["to_json"](msg)))


def update_run_body(run_id: str, status: str, end_time_ms: int) -> dict:
    """The documented ``runs/update`` JSON body ending a run."""
    m = _mlflow("runs/update")
    msg = m["UpdateRun"](run_id=run_id, run_uuid=run_id, status=m["RunStatus"].Value(status), end_time=end_time_ms)
    return dict(json.loads(m["to_json"](msg)))
