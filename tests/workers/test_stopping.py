"""Stopping by stationarity: the window estimate and the plateau test on planted loss streams, and in a pack
(a converged network leaves; its pack-mates' numbers do not move; a capped run extends bit for bit)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from workers.engine import (
    Algorithm,
    DynamicsSpec,
    InitSpec,
    LrSchedule,
    ModelSpec,
    NetStatus,
    NetworkSpec,
    Pack,
    StopRule,
    TaskSpec,
    Unit,
)
from workers.engine.schedule import lr_factor
from workers.engine.stopping import MAX_POINTS, Window, estimate, window_start

from .engine_ref import DEVICE, F64, assert_reports_close, only, run_reports

EVERY, WINDOW, TOL, Z = 20, 1000, 0.05, 2.0


def first_stop(losses: list[tuple[int, float]], *, window: int = WINDOW, tol: float = TOL, z: float = Z
               ) -> int | None:
    """The first report at which a network fed ``losses`` one report at a time would stop."""
    w = Window()
    for t, v in losses:
        w.add(t, v, window)
        est = w.estimate(window=window, rel_tol=tol, z=z)
        if est is not None and est.converged:
            return t
    return None


def ar1(rng: random.Random, n: int, sigma: float, rho: float) -> list[float]:
    """Stationary AR(1) noise with marginal std ``sigma``: SGD's floor wanders, it does not flicker."""
    out, x = [], rng.gauss(0, sigma)
    for _ in range(n):
        out.append(x)
        x = rho * x + math.sqrt(1 - rho * rho) * rng.gauss(0, sigma)
    return out


def test_window_is_the_last_steps_and_at_most_the_last_half() -> None:
    assert window_start(3000, 1000) == 2000
    assert window_start(600, 1000) == 300
    w = Window()
    for t in range(0, 3001, 100):
        w.add(t, 1.0, 1000)
    assert [t for t, _ in w.points] == list(range(2000, 3001, 100))


def test_known_plateau_stops_within_the_window() -> None:
    plateau = 2000  # a clean curve falling as 1/(1 + t/100) until step 2000, flat after
    curve = [(t, 1.0 / (1 + min(t, plateau) / 100)) for t in range(0, 8001, EVERY)]
    stop = first_stop(curve)
    assert stop is not None
    # Before the plateau the loss falls by log(1 + W/(100 + t - W)) >> tol over any window: no stop.
    assert plateau < stop <= plateau + WINDOW


def test_a_slow_power_law_tail_is_not_converged_until_it_flattens() -> None:
    """L = 1 + B t^-0.8: at step t the share of the loss still to go is f = B t^-0.8 / L, and the local
    log-log slope is -0.8 f. The test projects the window's trend over a doubling of t, so it stops only once
    0.8 f ln 2 < tol (f < 0.18 for tol 0.1), however long the run: a test over a fixed window of W steps
    would already stop with half of the loss still to go."""
    b = 1.5 * 2000**0.8  # f = 0.6 at t = 2000
    curve = [(t, 1.0 + b * max(t, 1) ** -0.8) for t in range(0, 60001, EVERY)]
    stop = first_stop(curve, tol=0.1)
    assert stop is not None
    f_stop = (b * stop**-0.8) / (1 + b * stop**-0.8)
    assert 0.12 < f_stop < 0.18, f_stop  # within ~2 tol of the limit, and not long after it got there
    def share(t: int) -> float:
        return (b * t**-0.8) / (1 + b * t**-0.8)

    per_window = next(t for t, _ in curve if t >= WINDOW and 0.8 * share(t) * WINDOW / t < 0.1)
    assert share(per_window) > 0.45 and per_window < stop  # what a per-window test would call converged


def test_window_memory_is_bounded_and_binning_keeps_the_estimate() -> None:
    """40,000 reports: the window spans the last quarter of the run (10,000 reports) in at most MAX_POINTS
    bins of equal size; its mean, slope and verdict agree with the unbinned estimate over the same span."""
    rng = random.Random(7)
    steps = list(range(1, 40001))
    curve = [(t, (1.0 + 300.0 / t) * math.exp(rng.gauss(0, 0.03))) for t in steps]
    w = Window()
    for t, v in curve:
        w.add(t, v, 1000)
        assert len(w.points) <= MAX_POINTS
    assert w.bin > 1 and len(w.points) >= MAX_POINTS // 2
    binned = w.estimate(window=1000, rel_tol=0.1, z=Z)
    raw = estimate([p for p in curve if p[0] >= window_start(40000, 1000)], window=1000, rel_tol=0.1, z=Z)
    assert binned is not None and raw is not None
    assert binned.mean == pytest.approx(raw.mean, rel=2e-3)
    assert binned.slope == pytest.approx(raw.slope, abs=0.02)
    assert binned.converged == raw.converged


def test_mean_and_standard_error_over_the_window() -> None:
    rng = random.Random(0)
    pts = [(t, 2.0 + rng.gauss(0, 0.1)) for t in range(1000, 2001, 10)]
    est = estimate(pts, window=WINDOW, rel_tol=TOL, z=Z)
    assert est is not None and est.n_points == len(pts) and est.start == 1000
    vals = [v for _, v in pts]
    assert est.mean == pytest.approx(sum(vals) / len(vals))
    assert est.se is not None and 0.1 / math.sqrt(len(pts)) * 0.5 < est.se < 0.1 / math.sqrt(len(pts)) * 2
    assert est.slope is not None and abs(est.slope) < 0.1


def test_serial_correlation_widens_the_standard_error() -> None:
    rng = random.Random(1)
    white = [(1000 + 10 * i, 1.0 + e) for i, e in enumerate(ar1(rng, 200, 0.05, 0.0))]
    wander = [(1000 + 10 * i, 1.0 + e) for i, e in enumerate(ar1(rng, 200, 0.05, 0.9))]
    se_white = estimate(white, window=WINDOW, rel_tol=TOL, z=Z).se  # type: ignore[union-attr]
    se_wander = estimate(wander, window=WINDOW, rel_tol=TOL, z=Z).se  # type: ignore[union-attr]
    assert se_white is not None and se_wander is not None and se_wander > 2.5 * se_white


def test_final_slope_is_d_log_loss_d_log_t() -> None:
    pts = [(t, 3.0 * t ** -0.7) for t in range(500, 1001, 25)]
    est = estimate(pts, window=WINDOW, rel_tol=TOL, z=Z)
    assert est is not None and est.slope == pytest.approx(-0.7, abs=1e-9)
    assert not est.converged  # falling by (1000/500)^0.7 - 1 = 62% over the window


SIGMA, RHO = 0.05, 0.5  # SGD-like: 5% wandering noise on the test loss, lag-1 correlation 0.5 between reports


def noisy(curve: list[tuple[int, float]], seed: int) -> list[tuple[int, float]]:
    noise = ar1(random.Random(seed), len(curve), SIGMA, RHO)
    return [(t, v * math.exp(e)) for (t, v), e in zip(curve, noise, strict=True)]


def test_sgd_noise_does_not_stop_a_still_decreasing_curve() -> None:
    """Planted: log L falls by 0.2 per window (4x the tolerance), 10,000 steps, 500 reports each tested: at
    most 2 of 50 replicates stop somewhere (measured: 1 in 100), none in the first 5 windows."""
    curve = [(t, math.exp(-0.2 * t / WINDOW)) for t in range(0, 10001, EVERY)]
    stops = [first_stop(noisy(curve, seed)) for seed in range(50)]
    assert sum(s is not None for s in stops) <= 2
    assert all(s is None or s > 5 * WINDOW for s in stops)


def test_sgd_noise_on_a_flat_curve_stops() -> None:
    """The same noise on a flat floor: every replicate stops, most within two windows of the first test."""
    flat = [(t, 0.3) for t in range(0, 10001, EVERY)]
    stops = [first_stop(noisy(flat, 1000 + seed)) for seed in range(50)]
    stopped = sorted(s for s in stops if s is not None)
    assert len(stopped) == 50
    assert stopped[len(stopped) // 2] <= 2 * WINDOW


def test_a_rising_loss_is_stationary_not_decreasing() -> None:
    curve = [(t, 1.0 + t / 1e4) for t in range(0, 3001, EVERY)]
    assert first_stop(curve) is not None


# --------------------------------------------------------------------------- in a pack

TEACHER = TaskSpec(kind="teacher", dim=5, seed=3, teacher_units=3, n_test=256)  # type: ignore[arg-type]


def _plateau(steps: int, **kw: object) -> DynamicsSpec:
    base: dict[str, object] = {"algorithm": Algorithm.SGD, "batch_size": 32, "eval_every": 10,
                               "stop_rule": StopRule.PLATEAU, "stop_window": 100, "stop_rel_tol": 0.05,
                               "stop_z": 1.0}
    return DynamicsSpec(steps=steps, **{**base, **kw})  # type: ignore[arg-type]


NETS = [NetworkSpec(1, 4, seed=1, lr=0.5), NetworkSpec(2, 4, seed=2, lr=0.002),
        NetworkSpec(3, 32, seed=3, lr=0.5), NetworkSpec(4, 32, seed=4, lr=0.002, temperature=1e-4)]
MODEL = ModelSpec(unit=Unit.RELU, init=InitSpec(bias_std=0.2))


def test_converged_network_retires_and_pack_mates_are_unchanged() -> None:
    dyn = _plateau(600)
    packed = Pack(TEACHER, MODEL, dyn, NETS, data_seed=5, dtype=F64, device=DEVICE)
    rep_packed = run_reports(packed)
    early = [nid for nid, r in packed.retired.items() if r.step < dyn.steps]
    late = [nid for nid, r in packed.retired.items() if r.step == dyn.steps]
    assert early and late, "the planted settings must stop some networks early and cap others"
    for nid in early:
        rec = packed.retired[nid]
        assert rec.status is NetStatus.FINISHED and rec.estimate is not None and rec.estimate.converged
        assert rec.reason.startswith("converged")
    for nid in NETS:
        alone = Pack(TEACHER, MODEL, dyn, [nid], data_seed=5, dtype=F64, device=DEVICE)
        rep_alone = run_reports(alone)
        assert_reports_close([r for r in only(rep_packed, [nid.net_id]) if r], [r for r in rep_alone if r])
        a, b = alone.retired[nid.net_id], packed.retired[nid.net_id]
        assert a.step == b.step and a.estimate is not None and b.estimate is not None
        assert a.estimate.mean == pytest.approx(b.estimate.mean, rel=1e-12)
        assert a.estimate.converged == b.estimate.converged


def test_birth_death_ends_when_stationary_and_the_network_is_judged_after(tmp_path: Path) -> None:
    """Plateau rule: a birth-death network whose loss is stationary under birth-death stops birth-death there
    (an adaptive quench, before the configured one), has no birth-death event after, and is judged only on
    the reports after that step; alone == packed; a checkpoint taken after the quench continues exactly."""
    steps, quench = 800, 200
    dyn = _plateau(steps, stop_rel_tol=0.3, bd_quench=quench)
    nets = [NetworkSpec(1, 8, seed=1, lr=0.5, bd_rate=2.0), NetworkSpec(2, 8, seed=1, lr=0.5),
            NetworkSpec(3, 16, seed=3, lr=0.5, bd_rate=2.0)]
    pack = Pack(TEACHER, MODEL, dyn, nets, data_seed=5, dtype=F64, device=DEVICE)
    events: dict[int, list[tuple[int, int]]] = {1: [], 3: []}
    reports = []
    for rep in pack.train():
        reports.append({m.net_id: (m.train_loss, m.test_loss) for m in rep.metrics})
        for nid, (kills, clones) in rep.bd_events.items():
            events[nid].append((rep.step, kills + clones))
    assert pack.bd_ended and all(t < steps - quench for t in pack.bd_ended.values())
    for nid, t_end in pack.bd_ended.items():
        rec = pack.retired[nid]
        assert rec.estimate is not None and rec.estimate.start >= t_end and rec.step > t_end
        assert sum(k for step, k in events[nid] if step <= t_end) > 0  # birth-death did run
        assert all(k == 0 for step, k in events[nid] if step > t_end + dyn.eval_every)
    for net in nets:
        alone = Pack(TEACHER, MODEL, dyn, [net], data_seed=5, dtype=F64, device=DEVICE)
        assert_reports_close([r for r in only(reports, [net.net_id]) if r], [r for r in run_reports(alone) if r])
        assert alone.bd_ended.get(net.net_id) == pack.bd_ended.get(net.net_id)
    # Save right after the first adaptive quench, load, finish: the same reports as the straight run.
    first = min(pack.bd_ended.values())
    again = Pack(TEACHER, MODEL, dyn, nets, data_seed=5, dtype=F64, device=DEVICE)
    head = []
    for rep in again.train():
        head.append({m.net_id: (m.train_loss, m.test_loss) for m in rep.metrics})
        if rep.step >= first + 5 * dyn.eval_every:
            break
    again.save(tmp_path / "q.pt")
    resumed = Pack.load(tmp_path / "q.pt", device=DEVICE)
    assert resumed.bd_ended == {k: v for k, v in pack.bd_ended.items() if v <= resumed.step}
    assert head + run_reports(resumed) == reports  # bit for bit


def test_fixed_rule_reports_convergence_at_the_cap() -> None:
    dyn = DynamicsSpec(algorithm=Algorithm.SGD, steps=400, batch_size=32, eval_every=10, stop_window=100,
                       stop_rel_tol=0.2, stop_z=1.0)
    pack = Pack(TEACHER, MODEL, dyn, NETS, data_seed=5, dtype=F64, device=DEVICE)
    run_reports(pack)
    assert all(r.step == 400 for r in pack.retired.values())
    assert all(r.estimate is not None and r.estimate.n_points == 11 for r in pack.retired.values())
    assert {r.estimate.converged for r in pack.retired.values() if r.estimate} == {True, False}


def test_extending_a_capped_run_equals_the_longer_run_bit_for_bit(tmp_path: Path) -> None:
    """Cap 300, then extended to 700 from the checkpoint == a straight 700-step run (CPU, float64), for every
    network that had not converged at 300; those that had converged are not trained again. Birth-death ends
    at step 250 in both (the quench grows with the cap)."""
    short_dyn, long_dyn = _plateau(300, bd_quench=50), _plateau(700, bd_quench=450)
    nets = [*NETS, NetworkSpec(5, 8, seed=6, lr=0.05, bd_rate=2.0)]
    short = Pack(TEACHER, MODEL, short_dyn, nets, data_seed=5, dtype=F64, device=DEVICE)
    run_reports(short)
    short.save(tmp_path / "p.pt")
    capped = {nid for nid, r in short.retired.items() if r.step == 300}
    go_on = sorted(nid for nid in capped if not short.retired[nid].estimate.converged)  # type: ignore[union-attr]
    assert go_on, "some network must still be falling at the first cap"

    resumed = Pack.load(tmp_path / "p.pt", device=DEVICE)
    resumed.extend(long_dyn)
    assert sorted(resumed.running) == go_on
    rest = run_reports(resumed)
    straight = Pack(TEACHER, MODEL, long_dyn, nets, data_seed=5, dtype=F64, device=DEVICE)
    full = [r for rep in straight.train() if rep.step > 300
            for r in [{m.net_id: (m.train_loss, m.test_loss) for m in rep.metrics}]]
    assert rest == full  # bit for bit
    for nid in go_on:
        a, b = resumed.retired[nid], straight.retired[nid]
        assert (a.step, a.final_test_loss, a.estimate) == (b.step, b.final_test_loss, b.estimate)
    for nid in capped - set(go_on):
        assert nid not in resumed.running and straight.retired[nid].step == 300


def test_extend_refuses_other_changes() -> None:
    pack = Pack(TEACHER, MODEL, _plateau(100), NETS[:1], data_seed=5, dtype=F64, device=DEVICE)
    run_reports(pack)
    with pytest.raises(ValueError, match=r"larger dynamics\.steps"):
        pack.extend(_plateau(200, batch_size=64))
    with pytest.raises(ValueError, match=r"larger dynamics\.steps"):
        pack.extend(_plateau(50))


# --------------------------------------------------------------------------- step-size schedule


def test_schedule_factors() -> None:
    inv = DynamicsSpec(steps=100, lr_schedule=LrSchedule.INVERSE_TIME, lr_decay_steps=10, lr_floor=0.2)
    assert [lr_factor(inv, t) for t in (0, 10, 30, 100)] == [1.0, 0.5, 0.25, 0.2]
    cos = DynamicsSpec(steps=100, lr_schedule=LrSchedule.COSINE, lr_floor=0.1)
    assert lr_factor(cos, 0) == 1.0 and lr_factor(cos, 100) == pytest.approx(0.1)
    assert lr_factor(cos, 50) == pytest.approx(0.55)


def test_scheduled_run_equals_the_same_steps_taken_one_dt_at_a_time() -> None:
    """Oracle: a pack with an inverse-time schedule == one-step packs at constant dt(t), chained through
    their particles, on the same batches (Langevin off, so no stream is consumed by the noise)."""
    dyn = DynamicsSpec(algorithm=Algorithm.GD, steps=6, eval_every=3, lr_schedule=LrSchedule.INVERSE_TIME,
                       lr_decay_steps=2.0)
    net = NetworkSpec(1, 6, seed=1, lr=0.3)
    task = TaskSpec(kind="teacher", dim=4, seed=1, teacher_units=2, n_train=64, n_test=64)  # type: ignore[arg-type]
    scheduled = Pack(task, MODEL, dyn, [net], dtype=F64, device=DEVICE)
    for _ in range(6):
        scheduled.step_once()
    z, b, c = Pack(task, MODEL, dyn, [net], dtype=F64, device=DEVICE).particles(1)
    for t in range(6):
        one = Pack(task, MODEL, DynamicsSpec(algorithm=Algorithm.GD, steps=1),
                   [NetworkSpec(1, 6, seed=1, lr=0.3 * lr_factor(dyn, t))], dtype=F64, device=DEVICE)
        g = one.groups[0]
        g.z[0], g.c[0] = z, c
        if b is not None and g.b is not None:
            g.b[0] = b
        one.step_once()
        z, b, c = one.particles(1)
    for got, want in zip(scheduled.particles(1), (z, b, c), strict=True):
        assert got is not None and want is not None
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
