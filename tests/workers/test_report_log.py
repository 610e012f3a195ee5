"""Checkpoints hold state, not history: their size does not grow with the reports, a restarted worker
continues without replaying, and the report log beside the checkpoint holds every report once, in order,
across worker kills (the oracle: the reports of the same job run without interruption)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import torch

from workers.engine import Algorithm, DynamicsSpec, ModelSpec, NetworkSpec, Pack, Report, TaskKind, TaskSpec
from workers.engine.reports import report_to_json
from workers.jobs import PackEvent, PackJob
from workers.reportlog import LOG_BYTES, log_path, read_events
from workers.runner import PackRunner

TASK = TaskSpec(kind=TaskKind.TEACHER, dim=4, seed=1, teacher_units=2, n_test=64)
# One network diverges (retired mid-run), so the log also carries a network's end.
NETS = (NetworkSpec(0, 8, seed=0, lr=0.05), NetworkSpec(1, 8, seed=1, lr=1e6), NetworkSpec(2, 12, seed=2, lr=0.05))


def job(tmp_path: Path, steps: int = 40, every: int = 8) -> PackJob:
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=steps, batch_size=8, eval_every=2)
    return PackJob("p", TASK, ModelSpec(), dyn, NETS, data_seed=3, dtype="float64",
                   checkpoint=str(tmp_path / "ck" / "p.pt"), checkpoint_every=every)


def uninterrupted(j: PackJob) -> list[Report]:
    return [ev.report for ev in PackRunner("cpu").train(replace(j, checkpoint=None))]


def checkpoint_bytes(reports: int) -> int:
    """Size of a checkpoint taken after ``reports`` reports (eval_every=1; the stopping window is full)."""
    dyn = DynamicsSpec(steps=10_000, batch_size=8, eval_every=1, stop_window=4)
    pack = Pack(TASK, ModelSpec(), dyn, [NetworkSpec(i, 8, seed=i) for i in range(4)], dtype=torch.float64)
    gen = pack.train()
    for _ in range(reports):
        next(gen)
    buf = io.BytesIO()
    torch.save(pack.state_dict(), buf)
    return len(buf.getvalue())


def test_checkpoint_size_does_not_grow_with_reports() -> None:
    # 3000 more reports of 4 networks: ~450 kB if reports were kept (a report line is ~150 B per network). The
    # stopping window spans the last quarter of the run but keeps at most MAX_POINTS (binned) points, so once
    # it is full (by report ~4 * 2 * MAX_POINTS) the state differs only in the digits of the numbers it holds.
    small, large = checkpoint_bytes(1000), checkpoint_bytes(4000)
    assert abs(large - small) < 1024, (small, large)


def test_killed_worker_resumes_without_replay_and_logs_each_report_once(tmp_path: Path) -> None:
    j = job(tmp_path)
    ref = uninterrupted(j)
    seen: list[PackEvent] = []
    for kill_after in (7, 6):  # two kills, each a few reports past a checkpoint (lines past it are in the log)
        gen = PackRunner("cpu").train(j)
        for _ in range(kill_after):
            seen.append(next(gen))
        gen.close()
    saved = Pack.load(j.checkpoint or "").step
    rest = list(PackRunner("cpu").train(j))
    # No replay: the restarted worker's first report is the first one past its checkpoint.
    assert rest[0].report.step == saved + j.dynamics.eval_every and rest[0].resumed_from == saved
    # Live, the driver sees reports past a checkpoint twice (it drops them by step); the log has each once.
    assert [ev.report for ev in read_events(j.checkpoint or "", "p")] == ref
    assert any(r.retired for r in ref[:-1])  # a network's end mid-run is in the log too
    last_seen = max(ev.report.step for ev in seen)
    assert [ev.report for ev in seen + rest if ev.report.step > last_seen] == \
        [r for r in ref if r.step > last_seen]  # bit for bit the same numbers after the restarts


def test_torn_last_line_is_ignored_and_cut_on_resume(tmp_path: Path) -> None:
    j = job(tmp_path)
    ref = uninterrupted(j)
    gen = PackRunner("cpu").train(j)
    for _ in range(5):
        next(gen)
    gen.close()
    path = log_path(j.checkpoint or "")
    whole = len(read_events(j.checkpoint or "", "p"))
    with path.open("ab") as fh:  # a worker killed mid-write
        fh.write(json.dumps({"worker": "w", "from": 0, "wall_s": 0.0, **report_to_json(ref[-1])}).encode()[:40])
    assert len(read_events(j.checkpoint or "", "p")) == whole
    list(PackRunner("cpu").train(j))
    assert [ev.report for ev in read_events(j.checkpoint or "", "p")] == ref


def test_checkpoint_records_the_log_length_it_covers(tmp_path: Path) -> None:
    j = job(tmp_path)
    gen = PackRunner("cpu").train(j)
    for _ in range(5):  # reports at steps 0..8: saved at step 8, lines at steps 0..8 covered
        next(gen)
    covered = Pack.load(j.checkpoint or "").checkpoint_extra[LOG_BYTES]
    lines = log_path(j.checkpoint or "").read_bytes()[:covered].splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 2, 4, 6, 8]
    gen.close()


def test_format_1_checkpoint_keeps_its_history(tmp_path: Path) -> None:
    """A checkpoint written before the report log (its reports in its meta) still resumes: its history is read
    by the driver and starts the log the worker writes."""
    j = job(tmp_path)
    ref = uninterrupted(j)
    pack = Pack(TASK, ModelSpec(), j.dynamics, NETS, data_seed=3, dtype=torch.float64)
    early = []
    for rep in pack.train():
        early.append(rep)
        if rep.step == 10:
            break
    state = pack.state_dict()
    meta = json.loads(state["meta"])
    meta["history"] = [report_to_json(r) for r in early]
    state.update(format=1, meta=json.dumps(meta))
    ck = Path(j.checkpoint or "")
    ck.parent.mkdir(parents=True)
    torch.save(state, ck)
    assert [ev.report for ev in read_events(ck, "p")] == early
    rest = [ev.report for ev in PackRunner("cpu").train(j)]
    assert rest == ref[len(early):]
    assert [ev.report for ev in read_events(ck, "p")] == ref


def test_reports_lost_in_flight_are_sent_again_on_rerun(tmp_path: Path) -> None:
    """A worker checkpoints a report before it leaves; if the worker dies before the report reaches the
    driver, the job run again (``resend_after`` = the last step the driver got) sends it from the log, so the
    driver gets every step once it drops repeats (the preemption case: a node lost mid-stream)."""
    j = job(tmp_path)
    ref = uninterrupted(j)
    gen = PackRunner("cpu").train(j)
    emitted = [next(gen) for _ in range(9)]
    gen.close()
    received = emitted[:4]  # the last 5 were in flight when the node went away
    last = received[-1].report.step
    saved = Pack.load(j.checkpoint or "").step
    assert saved > last  # the checkpoint covers reports the driver never got
    again = list(PackRunner("cpu").train(replace(j, resend_after=last)))
    got: dict[int, Report] = {}
    for ev in received + again:
        got.setdefault(ev.report.step, ev.report)
    assert sorted(got) == [r.step for r in ref]
    assert [got[r.step] for r in ref] == ref
    # The rerun starts with exactly the reports the driver missed up to the checkpoint (from the log), then
    # trains on from the checkpoint: without resend_after those steps would be lost.
    missed = [r for r in ref if last < r.step <= saved]
    assert missed and [ev.report for ev in again[:len(missed)]] == missed
    assert again[len(missed)].report.step == saved + j.dynamics.eval_every
