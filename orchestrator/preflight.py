"""Checks that run before Ray, MLflow or the output folder are touched, so bad input costs a second, not a
cluster start, and leaves nothing behind: the output path, the tracking URI, the Ray address, the device,
the worker count, and whether the widest network fits a worker's memory.

On a local cluster (no ``--address``, no ``RAY_ADDRESS``; or ``execution.backend=local``) the driver sees
the same machine the workers will, so device, worker count and memory are checked here against what
RayPool/LocalPool will find. On a remote cluster they can only be checked after connecting: RayPool refuses
``cuda`` without GPUs and ``plan_packs`` refuses a width that no worker can hold, both before any training.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

from .config import ConfigError, ExecutionConfig, ScalingConfig
from .errors import ServiceError
from .search_config import WIDTH, SearchConfig

# Store schemes MLflow's tracking client accepts (a plain path is a file store).
_TRACKING_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks"}
_PROBE_TIMEOUT_S = 5.0


def check_out(out: Path) -> None:
    """The output folder is a folder (new or existing) that can be created. The folders a probe creates
    are removed again: a rejected run leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder; pass a new folder path (or an "
                          "mfsweep output folder to continue)")
    missing = []
    probe = out
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is a file, so the folder cannot be created; pass another path")
    if not missing:
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {out} is not writable; pass a folder you can write to")
        return
    try:
        out.mkdir(parents=True)
    except OSError as err:
        raise ConfigError(f"--out {out} cannot be created ({err.strerror}); pass a folder you can write to"
                          ) from None
    finally:
        for d in missing:  # deepest first
            if d.is_dir():
                d.rmdir()


def check_tracking_uri(uri: str | None) -> None:
    if uri is None:
        return
    scheme = urlparse(uri).scheme.lower().split("+")[0]
    if len(scheme) == 1:  # a Windows drive letter: a path
        return
    if scheme not in _TRACKING_SCHEMES:
        raise ConfigError(f"--tracking-uri {uri}: MLflow cannot use the scheme '{scheme}'; pass "
                          "sqlite:///<dir>/mlflow.db, postgresql://..., or http(s)://<mlflow server>")


def check_ray_address(backend: str, address: str | None) -> None:
    """A Ray address that nothing answers on fails in seconds, not after Ray's minute of retries."""
    if address is None:
        return
    if backend == "local":
        raise ConfigError(f"--address {address} needs execution.backend=ray (the local backend runs in this "
                          "process); drop --address or use --backend ray")
    if address in ("auto", "local"):
        return
    target = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        host, port = target.hostname, target.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise ConfigError(f"--address {address}: expected ray://host:10001, host:6379 or auto")
    try:
        with socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ServiceError(f"cannot reach Ray at {address} ({why}); start the cluster (ray start --head) or "
                           "fix --address (ray://host:10001 or host:6379), or omit it for a local cluster"
                           ) from None


def is_local(backend: str, address: str | None) -> bool:
    """Whether the workers run on this machine (the driver can check their device and memory itself)."""
    return backend == "local" or (address is None and not os.environ.get("RAY_ADDRESS"))


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _ram_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _may_have_gpu() -> bool:
    """False only where no NVIDIA or ROCm driver is present: torch (seconds to import, on the way to the first
    training step) is then not needed to learn that there is no GPU."""
    return (Path("/proc/driver/nvidia").exists() or Path("/dev/kfd").exists()  # NVIDIA, ROCm
            or any(shutil.which(tool) for tool in ("nvidia-smi", "rocm-smi")))


def _torch_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_memory(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).total_memory)


def local_worker_memory(ex: ExecutionConfig) -> tuple[int, str]:
    """(bytes, description) of the memory one local worker plans against, as PackRunner.info() reports it:
    the smallest GPU's memory, or this machine's RAM shared among the CPU workers. Raises ServiceError for
    ``cuda`` without a usable GPU, ConfigError for more workers than the machine can place (Ray would wait
    for them)."""
    gpus = 0 if not _may_have_gpu() else _torch_gpus()
    if ex.device == "cuda" and gpus == 0:
        raise ServiceError("execution.device=cuda but this machine has no usable GPU (torch sees no CUDA "
                           "device); use --device cpu or auto, or run on a GPU machine / --address cluster")
    if ex.backend == "local":  # one worker process
        if gpus and ex.device != "cpu":
            return _gpu_memory(0), "the GPU"
        return _ram_bytes(), "this machine"
    cpus = _cpus()
    if gpus and ex.device != "cpu":
        if ex.workers is not None and ex.workers > gpus:
            raise ConfigError(f"execution.workers={ex.workers} but this machine has {gpus} GPU(s) (one worker "
                              f"each); set execution.workers <= {gpus} or leave it unset")
        mem = min(_gpu_memory(i) for i in range(gpus))
        return int(mem), "a GPU worker"
    if ex.cpus_per_worker > cpus:
        raise ConfigError(f"execution.cpus_per_worker={ex.cpus_per_worker} but this machine has {cpus} CPUs; set "
                          f"it <= {cpus}")
    fit = cpus // ex.cpus_per_worker
    if ex.workers is not None and ex.workers > fit:
        raise ConfigError(f"execution.workers={ex.workers} x cpus_per_worker={ex.cpus_per_worker} needs "
                          f"{ex.workers * ex.cpus_per_worker} CPUs, this machine has {cpus}; set "
                          f"execution.workers <= {fit} or leave it unset")
    n = ex.workers or max(1, fit)
    return _ram_bytes() // n, f"each of {n} CPU worker(s)"


def _check_services(ex: ExecutionConfig, out: Path, address: str | None, tracking_uri: str | None) -> bool:
    """The checks every run shares; True when the workers are local (device and memory checked next)."""
    check_out(out)
    check_tracking_uri(tracking_uri)
    check_ray_address(ex.backend, address)
    return is_local(ex.backend, address)


def check_scaling(cfg: ScalingConfig, out: Path, address: str | None, tracking_uri: str | None = None) -> None:
    """Everything about a scaling sweep that can be known before Ray starts (ConfigError / ServiceError)."""
    if _check_services(cfg.execution, out, address, tracking_uri):
        from .plan import check_fits  # loads torch: after the checks that need none

        mem, where = local_worker_memory(cfg.execution)
        check_fits(cfg, mem, cfg.sweep.widths, where=where)


def check_search(cfg: SearchConfig, out: Path, address: str | None, tracking_uri: str | None = None) -> None:
    """As :func:`check_scaling` for a search: the widths its trials (or fidelity stages) will have, with the
    fixed settings (a searched batch size or unit is checked per trial, which fails alone if it cannot fit)."""
    if not _check_services(cfg.execution, out, address, tracking_uri):
        return
    from .plan import check_fits  # loads torch: after the checks that need none

    s = cfg.search
    if s.fidelity is not None:
        widths = list(s.fidelity.widths)
    elif WIDTH in s.space:
        widths = [int(w) for w in s.space[WIDTH].endpoints()]
    else:
        widths = [s.width]
    base, _ = cfg.resolve({}, widths[0], where=f"{cfg.name} (fixed settings)")
    mem, where = local_worker_memory(cfg.execution)
    check_fits(base, mem, widths, where=where)
