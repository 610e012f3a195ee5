"""One driver per output folder: a second driver (scaling, resume or search) is refused with one line before
it writes anything; the lock of a driver that died (SIGKILL on this host, or a lease run out on another host)
is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import config as cfgmod
from orchestrator.cli import main
from orchestrator.runfolder import LOCK_NAME, FolderBusy, hold
from tests.orchestrator.test_search import write_cfg

ROOT = Path(__file__).resolve().parents[2]
TINY = ["sweep.variants=[]", "sweep.widths=[8]", "sweep.seeds=1", "dynamics.steps=20", "dynamics.eval_every=10",
        "dynamics.batch_size=16", "task.n_test=64", "execution.backend=local"]
HOLD = ("import sys; from pathlib import Path; from orchestrator.runfolder import hold\n"
        "with hold(Path(sys.argv[1]), 'mfsweep scaling'):\n    print('held', flush=True); sys.stdin.read()")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another driver process holding ``tmp_path / 'out'``."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    yield proc, out
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def scaling_args(out: Path) -> list[str]:
    return ["scaling", "--out", str(out), "--no-progress", *[x for s in TINY for x in ("--set", s)]]


def refused(capsys: pytest.CaptureFixture[str], code: int, pid: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line
    assert "in use by another driver" in err and f"pid {pid}" in err and "--out" in err, err
    return err


def test_second_driver_is_refused_before_writing(holder: tuple[subprocess.Popen[str], Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    proc, out = holder
    refused(capsys, main(["search", str(write_cfg(tmp_path)), "--out", str(out), "--no-progress"]), proc.pid)
    refused(capsys, main(scaling_args(out)), proc.pid)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    (out / "config.yaml").write_text(cfgmod.dump(cfgmod.load(None, TINY)))
    refused(capsys, main(["resume", str(out), "--no-progress"]), proc.pid)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", LOCK_NAME]


def test_a_killed_drivers_lock_is_taken_over(holder: tuple[subprocess.Popen[str], Path],
                                             caplog: pytest.LogCaptureFixture) -> None:
    proc, out = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="orchestrator.runfolder"):
        assert main(scaling_args(out)) == 0
    assert f"pid {proc.pid}" in caplog.text and "took over" in caplog.text
    assert json.loads((out / LOCK_NAME).read_text() or "{}") == {}  # released on exit
    assert (out / "summary.json").exists()


def _lease(out: Path, age_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"host": "other-host", "pid": 4242, "command": "mfsweep search",
                                             "renewed": time.time() - age_s, "lease_s": 60}))


def test_a_lease_of_another_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On volumes whose flock does not reach across hosts, the lease decides: fresh = held, run out = free."""
    out = tmp_path / "shared"
    _lease(out, age_s=5)
    with pytest.raises(FolderBusy, match=r"other-host, pid 4242.*lease renewed"), hold(out, "mfsweep scaling"):
        pass
    _lease(out, age_s=300)
    with caplog.at_level(logging.WARNING, logger="orchestrator.runfolder"), hold(out, "mfsweep scaling"):
        rec = json.loads((out / LOCK_NAME).read_text())
        assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid()
        with hold(out, "mfsweep scaling"):  # the same driver again (the CLI, then the sweep): fine
            pass
    assert "took over" in caplog.text and "other-host" in caplog.text
