"""Birth-death resampling (Rotskoff, Jelassi, Bruna & Vanden-Eijnden, ICML 2019), vectorised over networks.

For each network (a row) with per-particle potential V_i:

    beta_i = V_i - mean(V)
    beta_i > 0: particle i dies   with probability p_i;  its slot takes a copy of a uniformly chosen survivor
                                                        (scheme ``clone``) or a fresh prior draw with c = 0
                                                        (scheme ``prior``)
    beta_i < 0: particle i clones with probability p_i;  the copy replaces a uniformly chosen particle

p_i = 1 - exp(-alpha |beta_i| dt k) (``per_time``, k = steps between applications) or min(1, alpha |beta_i|)
(``per_step``). All moves of one application are simultaneous: copies read the state before the
application, and a clone's copy lands on a slot that neither dies nor clones this time (if there are fewer
such slots than clones, the surplus clones are dropped), so n stays fixed and every kill/clone is paired.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Resampling:
    """The outcome of one application on S networks of n particles."""

    source: Tensor
    """(S, n) long: slot i takes the pre-application particle ``source[s, i]``."""
    fresh: Tensor
    """(S, n) bool: slot i takes a fresh prior draw instead (scheme ``prior`` kills)."""
    kills: Tensor
    """(S,) number of particles that died."""
    clones: Tensor
    """(S,) number of particles that were duplicated."""


def probabilities(beta: Tensor, alpha: Tensor, dt: Tensor, every: int, per_time: bool) -> Tensor:
    """Per-particle event probabilities (S, n) from mean-subtracted potentials beta (S, n) and (S,) rates."""
    rate = alpha.unsqueeze(1) * beta.abs()
    if per_time:
        return -torch.expm1(-rate * dt.unsqueeze(1) * every)
    return rate.clamp(max=1.0)


def _draw(potential: Tensor, prob_fn_args: tuple[Tensor, Tensor, int, bool], u: Tensor) -> tuple[Tensor, Tensor]:
    """(beta, event): mean-subtracted potentials and which particles the uniforms u (S, n) select."""
    alpha, dt, every, per_time = prob_fn_args
    beta = potential - potential.mean(dim=1, keepdim=True)
    return beta, u < probabilities(beta, alpha, dt, every, per_time)


def events(potential: Tensor, prob_fn_args: tuple[Tensor, Tensor, int, bool], u: Tensor) -> Tensor:
    """(S, n) bool: particles that die or clone at this application, given its first uniforms u (S, n)
    (the same draw as in :func:`resample`; a cheap test that an application moves nothing)."""
    beta, event = _draw(potential, prob_fn_args, u)
    return event & (beta != 0)


def resample(potential: Tensor, prob_fn_args: tuple[Tensor, Tensor, int, bool], uniforms: Tensor,
             prior: Tensor) -> Resampling:
    """Draw one birth-death application.

    potential: (S, n) per-particle potentials V; prob_fn_args: (alpha (S,), dt (S,), every, per_time);
    uniforms: (S, 4, n) in [0, 1) drawn from each network's own stream; prior: (S,) bool, scheme ``prior``.
    """
    s, n = potential.shape
    u, key_t, key_c, pick = uniforms.unbind(1)  # each (S, n)
    beta, event = _draw(potential, prob_fn_args, u)
    kill = event & (beta > 0)
    clone = event & (beta < 0)

    ar = torch.arange(n, device=potential.device).expand(s, n)
    source = ar.clone()
    # Clones: the r-th clone (random order) overwrites the r-th eligible slot (random order).
    eligible = ~(kill | clone)
    order_t = torch.argsort(torch.where(eligible, key_t, 2.0), dim=1)
    order_c = torch.argsort(torch.where(clone, key_c, 2.0), dim=1)
    n_done = torch.minimum(clone.sum(1), eligible.sum(1))  # (S,)
    use = ar < n_done.unsqueeze(1)
    source.scatter_(1, order_t, torch.where(use, order_c, order_t))
    # Kills: slot takes a uniformly chosen survivor (survivors listed first by a stable sort).
    survivor = ~kill
    n_surv = survivor.sum(1, keepdim=True)  # (S, 1)
    order_s = torch.argsort((~survivor).to(torch.int8), dim=1, stable=True)
    idx = (pick * n_surv).long().clamp(max=n - 1).clamp_max(n_surv - 1).clamp_min(0)
    kill_src = torch.gather(order_s, 1, idx)
    kill = kill & (n_surv > 0)
    fresh = kill & prior.unsqueeze(1)
    source = torch.where(kill & ~fresh, kill_src, source)
    return Resampling(source=source, fresh=fresh, kills=kill.sum(1), clones=n_done)
