"""Per-iteration schedules, precomputed as arrays (one value per optimisation step)."""

from __future__ import annotations

import math

import numpy as np


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then a half
    cosine from ``start`` to ``end``:

        v(t) = end + (start - end) * (1 + cos(pi * (t - w) / (T - w))) / 2,   t >= w.
    """
    if total_steps < 1:
        raise ValueError("a schedule needs at least one step")
    warmup_steps = min(max(0, warmup_steps), total_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    n = total_steps - warmup_steps
    t = np.arange(n)
    cos = end + 0.5 * (start - end) * (1 + np.cos(math.pi * t / max(1, n)))
    return np.concatenate([warm, cos]).astype(np.float64)


def warmup_constant_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear ramp from ``start`` to ``end`` over ``warmup_steps``, then constant ``end``."""
    if total_steps < 1:
        raise ValueError("a schedule needs at least one step")
    warmup_steps = min(max(0, warmup_steps), total_steps)
    ramp = np.linspace(start, end, warmup_steps, endpoint=False) if warmup_steps else np.array([])
    return np.concatenate([ramp, np.full(total_steps - warmup_steps, end)]).astype(np.float64)
