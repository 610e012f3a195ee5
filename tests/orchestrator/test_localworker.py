"""The local pool's worker process: replaced when it dies (the pack continues from its checkpoint, nothing
fails), stopped and reused between runs, started early by the command, and a start failure is one line.
The oracle for every network's result is the same networks trained in one uninterrupted in-process pack."""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import localworker
from orchestrator.pool import LocalPool, PoolError, WorkersLost
from workers.jobs import PackEvent, PackJob

from .test_pool_contract import CFG, jobs_for, reference_losses


def _finals(events: list[PackEvent]) -> dict[int, float]:
    return {r.net_id: r.final_test_loss for ev in events for r in ev.report.retired if r.final_test_loss is not None}


def _one_job(tmp_path: Path, pool: LocalPool) -> PackJob:
    _, jobs = jobs_for(tmp_path, pool)
    return jobs[0]


def test_a_killed_worker_is_replaced_and_its_pack_continues_from_the_checkpoint(tmp_path: Path) -> None:
    pool = LocalPool("cpu", max_retries=0)  # no retry to spare: a lost worker must not use one up
    try:
        job = _one_job(tmp_path, pool)
        first_pid = pool.runner.pid
        events: list[PackEvent] = []
        killed = []

        def on_event(ev: PackEvent) -> None:
            events.append(ev)
            if ev.report.step == 20 and not killed:
                assert pool.runner.pid is not None
                os.kill(pool.runner.pid, signal.SIGKILL)
                killed.append(pool.runner.pid)

        assert pool.run([job], on_event) == []
        assert killed == [first_pid] and pool.runner.pid != first_pid and pool.runner.alive()
        steps = sorted({ev.report.step for ev in events})
        assert steps == list(range(0, CFG.dynamics.steps + 1, CFG.dynamics.eval_every))
        ref = reference_losses()
        finals = _finals(events)
        assert set(finals) == {s.net_id for s in job.networks}
        for nid, loss in finals.items():
            assert loss == pytest.approx(ref[nid], rel=1e-5)
    finally:
        pool.close()


def test_a_worker_that_keeps_dying_stops_the_run_and_fails_nothing(tmp_path: Path) -> None:
    pool = LocalPool("cpu", max_retries=3)
    try:
        # No checkpoint before the end: every new worker starts the pack over, so no report is ever new.
        job = replace(_one_job(tmp_path, pool), checkpoint_every=10_000)
        done: list[object] = []

        def on_event(ev: PackEvent) -> None:
            assert pool.runner.pid is not None
            os.kill(pool.runner.pid, signal.SIGKILL)

        with pytest.raises(WorkersLost) as err:
            pool.run([job], on_event, on_done=lambda j, f: done.append(f) or [])
        msg = str(err.value)
        assert "killed by SIGKILL" in msg and f"{pool.MAX_LOSSES} times in a row" in msg
        assert "nothing was recorded as failed" in msg and "mfsweep resume" in msg and "\n" not in msg
        assert done == []  # the job was neither finished nor failed
    finally:
        pool.close()


def test_a_stopped_pack_leaves_the_worker_ready_for_the_next_run(tmp_path: Path) -> None:
    pool = LocalPool("cpu", max_retries=0)
    try:
        job = _one_job(tmp_path, pool)
        pid = pool.runner.pid
        stop = threading.Event()
        first: list[PackEvent] = []

        def on_event(ev: PackEvent) -> None:
            first.append(ev)
            if ev.report.step == 20:
                stop.set()

        assert pool.run([job], on_event, stop=stop) == []
        assert [ev.report.step for ev in first] == [0, 10, 20]  # nothing trained past the stop
        rest: list[PackEvent] = []
        assert pool.run([job], rest.append) == []  # the same worker, from the checkpoint at step 20
        assert pool.runner.pid == pid
        assert rest[0].report.step >= 20 and rest[-1].report.step == CFG.dynamics.steps
        ref = reference_losses()
        for nid, loss in _finals(rest).items():
            assert loss == pytest.approx(ref[nid], rel=1e-5)
    finally:
        pool.close()


def test_the_prewarmed_worker_is_the_one_the_pool_uses() -> None:
    warm = localworker.prewarm("cpu")
    pool = LocalPool("cpu")
    try:
        assert pool.runner is warm and pool.runner.alive()
    finally:
        pool.close()
    assert not warm.alive()  # closing the pool ends its process


def test_a_worker_that_cannot_start_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: a cuda worker starts")
    with pytest.raises(PoolError) as err:
        LocalPool("cuda")
    msg = str(err.value)
    assert msg.startswith("the local worker could not start: RuntimeError: execution.device=cuda")
    assert "\n" not in msg
