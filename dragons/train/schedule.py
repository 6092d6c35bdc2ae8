"""Learning-rate schedules: one-cycle with discriminative rates, and the lr finder's pick."""

from __future__ import annotations

import math
import warnings

import torch


def discriminative_lrs(lr: float, mult: float, n_groups: int) -> list[float]:
    """fastai's ``slice(lr / mult, lr)``: geometric rates from the first group to the last."""
    if n_groups == 1:
        return [lr]
    return [lr / mult ** (1 - i / (n_groups - 1)) for i in range(n_groups)]


def one_cycle(
    opt: torch.optim.Optimizer,
    max_lrs: list[float],
    total_steps: int,
    pct_start: float = 0.25,
    div: float = 25.0,
    div_final: float = 1e5,
    start_step: int = 0,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """A one-cycle schedule (warm-up then cosine annealing), resumable at ``start_step``."""
    total = max(2, total_steps)
    # torch divides by each phase's length in steps (pct_start * total - 1, then the
    # rest): a phase of length zero (4 steps at 0.25: a tiny data set) divides by zero.
    if math.isclose(pct_start * total, 1.0):
        pct_start = 1.5 / total
    elif math.isclose(pct_start * total, total):
        pct_start = (total - 0.5) / total
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lrs,
        total_steps=total,
        pct_start=pct_start,
        div_factor=div,
        final_div_factor=div_final / div,
        anneal_strategy="cos",
        cycle_momentum=False,
    )
    with warnings.catch_warnings():  # advancing without optimiser steps is intended on resume
        warnings.simplefilter("ignore")
        for _ in range(min(start_step, max(2, total_steps) - 1)):
            sched.step()
    return sched


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """Debiased exponential moving average, as fastai smooths lr_find losses."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta**i))
    return out


def suggest_valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's 'valley' suggestion: in the longest steadily-falling stretch of the
    smoothed loss curve, a point two thirds down the slope."""
    n = len(losses)
    if n < 3:
        return lrs[0] if lrs else 1e-3
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max_start + int(sections) + int(sections / 2)
    idx = min(max(idx, 0), n - 1)
    return float(lrs[idx])


def exp_lrs(start: float, end: float, steps: int) -> list[float]:
    return [start * (end / start) ** (i / max(1, steps - 1)) for i in range(steps)]


def is_finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
