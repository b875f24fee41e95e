"""When masks change and by how much: update steps, drop fraction, DynaDiag's temperature."""
from __future__ import annotations

import math

from .config import DROP_SCHEDULES, check_choice


def is_update_step(step: int, delta_t: int, horizon: float) -> bool:
    """Masks change every ``delta_t`` steps, never at step 0, and stop at ``horizon`` (in steps)."""
    return 0 < step < horizon and step % delta_t == 0


def drop_fraction(step: int, alpha: float, horizon: float, schedule: str = "cosine") -> float:
    """Fraction of a layer's nnz dropped (and regrown) at ``step``.

    cosine (RigL): alpha/2 (1 + cos(pi t / horizon)); linear: alpha (1 - t / horizon);
    constant: alpha. Zero from the horizon on.
    """
    check_choice("drop_schedule", schedule, DROP_SCHEDULES)
    if step >= horizon:
        return 0.0
    t = step / max(horizon, 1e-12)
    if schedule == "cosine":
        return alpha / 2 * (1 + math.cos(math.pi * t))
    if schedule == "linear":
        return alpha * (1 - t)
    return alpha


def cosine_anneal(step: int, start: float, end: float, horizon: float) -> float:
    """``start`` at step 0 down to ``end`` at ``horizon`` along a half cosine, ``end`` after."""
    if horizon <= 0 or step >= horizon:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / horizon))
