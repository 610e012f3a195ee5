"""The ``mfsweep`` command line.

    mfsweep scaling [CONFIG] [--set section.key=value ...] [--out DIR] [--address RAY] [--tracking-uri URI]
                    [--device auto|cpu|cuda]
    mfsweep resume DIR
    mfsweep search CONFIG [--trials N] [--storage URL] [--study NAME] ...
    mfsweep validate CONFIG [--set ...]      (a scaling or a search config)

Exit codes: 0 done, 2 bad input (one line on stderr naming the key and the fix; or the output folder is in
use by another driver), 3 a service could not be used (Ray, MLflow, Optuna storage; or no Ray worker alive for
``execution.wait_for_workers_s``), 130 interrupted (resume with ``mfsweep resume DIR``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from rich.console import Console

if TYPE_CHECKING:
    from .config import ExecutionConfig

EXIT_BAD_INPUT = 2
EXIT_SERVICE = 3
EXIT_INTERRUPTED = 130


def _common(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument("config", nargs="?", default=None,
                       help="YAML config (default: the embedded quick-start sweep)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set sweep.seeds=3 (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<name>-<timestamp>)")
    p.add_argument("--address", default=None, help="Ray cluster address (ray://host:10001, host:6379, auto)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default sqlite:///<out>/mlflow.db)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="override execution.device")
    p.add_argument("--backend", choices=["ray", "local"], default=None, help="override execution.backend")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (its default prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mfsweep", description="Mean-field particle training sweeps: "
                                     "error vs width on Ray, Optuna search, MLflow tracking.")
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scaling", help="run an error-vs-width sweep (the main job)")
    _common(sc)
    rs = sub.add_parser("resume", help="finish an interrupted scaling sweep or search in DIR")
    rs.add_argument("dir", type=Path)
    rs.add_argument("--set", dest="overrides", action="append", default=[], metavar="dynamics.steps=N",
                    help="extend a scaling sweep to more steps (networks that converged are not retrained)")
    rs.add_argument("--address", default=None)
    rs.add_argument("--tracking-uri", default=None)
    rs.add_argument("--no-progress", action="store_true")
    va = sub.add_parser("validate", help="validate a scaling or search config and print it resolved")
    va.add_argument("config")
    va.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    se = sub.add_parser("search", help="Optuna search over architectures and dynamics")
    _common(se)
    se.add_argument("--trials", type=int, default=None, help="number of trials (overrides search.trials)")
    se.add_argument("--storage", default=None,
                    help="Optuna storage URL (default: a journal file in the output folder)")
    se.add_argument("--study", default=None, help="study name (default: the config's name)")
    return parser


def _direct(args: argparse.Namespace) -> dict[str, object]:
    direct: dict[str, object] = {}
    if getattr(args, "device", None):
        direct["execution.device"] = args.device
    if getattr(args, "backend", None):
        direct["execution.backend"] = args.backend
    if getattr(args, "trials", None) is not None:
        direct["search.trials"] = args.trials
    return direct


def _browse_hint(out: Path, tracking_uri: str | None) -> str:
    """How to look at the sweep in MLflow: the command and the page that opens on its runs."""
    from .credentials import redact
    from .mlflow_view import ui_page

    try:
        exp = json.loads((out / "summary.json").read_text())["mlflow"]["experiment_id"]
    except (OSError, ValueError, KeyError, TypeError):
        exp = None
    if tracking_uri:
        where = redact(tracking_uri)
        page = ui_page(exp, where.rstrip("/")) if exp and where.startswith("http") else where
        return f"browse it at {page}"
    cmd = f"mlflow ui --backend-store-uri sqlite:///{(out / 'mlflow.db').resolve()}"
    return f"browse with: {cmd}, then open {ui_page(exp)}" if exp else f"browse with: {cmd}"


def _default_out(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _start_local_worker(ex: ExecutionConfig) -> None:
    """With the local backend, its worker process starts now, once the input is checked: torch loads there
    while this process loads the driver (localworker.py)."""
    if ex.backend == "local":
        from .localworker import prewarm

        prewarm(ex.device)


# Each command validates its input and runs the preflight checks before importing the drivers: those load
# torch, Ray, Optuna and MLflow (seconds), and a bad input should cost well under a second.
def _scaling(args: argparse.Namespace, console: Console) -> int:
    from . import config as config_mod
    from . import runfolder
    from .preflight import check_scaling

    cfg = config_mod.load(args.config or config_mod.QUICKSTART, args.overrides, **_direct(args))
    out = args.out or _default_out(cfg.name)
    check_scaling(cfg, out, args.address, args.tracking_uri)
    _start_local_worker(cfg.execution)
    with runfolder.hold(out, "mfsweep scaling"):  # before anything in the folder is read or written
        old = out / "config.yaml"
        if old.exists():
            previous = config_mod.load(old)
            if previous != cfg:
                raise config_mod.ConfigError(f"{out} holds a different sweep; pick a new --out, or continue it "
                                             f"with: mfsweep resume {out}")
            console.print(f"resuming {out}")
        elif (out / "search.yaml").exists():
            raise config_mod.ConfigError(f"{out} holds a search; pick a new --out")
        from .scaling import ScalingSweep

        ScalingSweep(cfg, out, tracking_uri=args.tracking_uri, address=args.address, console=console,
                     progress=not args.no_progress).run()
    console.print(f"done: {out}/summary.json; {_browse_hint(out, args.tracking_uri)}", soft_wrap=True)
    return 0


def _resume(args: argparse.Namespace, console: Console) -> int:
    from . import config as config_mod
    from . import runfolder
    from .preflight import check_scaling, check_search

    if (args.dir / "search.yaml").exists():
        from .search_config import load_search

        search = load_search(args.dir / "search.yaml")
        check_search(search, args.dir, args.address, args.tracking_uri)
        _start_local_worker(search.execution)
        from .search import resume_search

        if args.overrides:
            raise config_mod.ConfigError("resume --set extends scaling sweeps only; a search resumes as it was")

        return resume_search(args.dir, address=args.address, tracking_uri=args.tracking_uri,
                             progress=not args.no_progress, console=console)
    path = args.dir / "config.yaml"
    if not path.exists():
        raise config_mod.ConfigError(f"{args.dir} is not an mfsweep output folder (no config.yaml); pass the "
                                     "folder a sweep or search wrote")
    cfg = config_mod.extend(config_mod.load(path), args.overrides)
    check_scaling(cfg, args.dir, args.address, args.tracking_uri)
    _start_local_worker(cfg.execution)
    from .scaling import ScalingSweep

    with runfolder.hold(args.dir, "mfsweep resume"):
        if args.overrides:
            path.write_text(config_mod.dump(cfg))
        ScalingSweep(cfg, args.dir, tracking_uri=args.tracking_uri, address=args.address, console=console,
                     progress=not args.no_progress).run()
    return 0


def _validate(args: argparse.Namespace, console: Console) -> int:
    """Validate a scaling config, or a search config (recognised by its ``search`` section)."""
    from . import config as config_mod

    raw = config_mod.load_raw(args.config)
    if "search" in raw:
        from .search_config import load_search

        search = load_search(args.config, args.overrides)
        print(config_mod.dump(search), end="")
        console.print(f"search ok: {len(search.search.space)} parameters, {search.search.trials} trials, "
                      f"sampler {search.search.sampler.name}, pruner {search.search.pruner_name}")
        return 0
    cfg = config_mod.load(args.config, args.overrides)
    print(config_mod.dump(cfg), end="")
    for name, _ in cfg.variant_configs():
        console.print(f"variant ok: {name}")
    return 0


def _search(args: argparse.Namespace, console: Console) -> int:
    from .preflight import check_search
    from .search_config import load_search

    cfg = load_search(args.config, args.overrides, **_direct(args))
    out = args.out or _default_out(cfg.name)
    check_search(cfg, out, args.address, args.tracking_uri)
    _start_local_worker(cfg.execution)
    from .search import run_search_cli

    return run_search_cli(args, console, cfg=cfg, out=out)


def _known_error(err: Exception) -> int | None:
    """Exit code of an error a driver module raises, looked up among the modules already loaded (importing
    them only to name their errors would load Ray and torch on every bad input)."""
    codes = (("orchestrator.pool", "PoolError", EXIT_SERVICE), ("orchestrator.study", "StorageError", EXIT_SERVICE),
             ("orchestrator.driver", "Interrupted", EXIT_INTERRUPTED))
    for module, name, code in codes:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and isinstance(err, cls):
            return code
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    from .config import ConfigError
    from .errors import ServiceError, TrackingError

    handler = {"scaling": _scaling, "resume": _resume, "validate": _validate, "search": _search}
    try:
        if args.command != "validate":
            from .credentials import has_password, move_password_to_env
            from .localray import reap_dead_drivers

            for flag, storage in (("tracking_uri", False), ("storage", True)):
                url = getattr(args, flag, None)
                if url and has_password(url):
                    console.print(f"[yellow]warning:[/] the password in --{flag.replace('_', '-')} is visible to "
                                  "every user of this host (process list); pass it in the environment instead "
                                  "(README, Running on a cluster). It is not stored.", soft_wrap=True,
                                  highlight=False)
                    setattr(args, flag, move_password_to_env(url, storage))

            reap_dead_drivers(lambda msg: console.print(msg, soft_wrap=True, highlight=False))
        return handler[args.command](args, console)
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True, highlight=False)
        return EXIT_BAD_INPUT
    except (TrackingError, ServiceError) as err:
        console.print(f"[red]error:[/] {err}", soft_wrap=True, highlight=False)
        return EXIT_SERVICE
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; finished results are kept. Resume with: mfsweep resume DIR[/]")
        return EXIT_INTERRUPTED
    except Exception as err:
        code = _known_error(err)
        if code is None:
            raise
        style = "yellow" if code == EXIT_INTERRUPTED else "red"
        prefix = "" if code == EXIT_INTERRUPTED else "error: "
        console.print(f"[{style}]{prefix}{err}[/]", soft_wrap=True, highlight=False)
        return code


if __name__ == "__main__":
    sys.exit(main())
