import math

import pytest

from dst.schedules import cosine_anneal, drop_fraction, is_update_step


def test_cosine_drop_fraction_starts_at_alpha_and_halves_at_mid_horizon():
    assert drop_fraction(0, 0.3, 750, "cosine") == pytest.approx(0.3)
    assert drop_fraction(375, 0.3, 750, "cosine") == pytest.approx(0.15)
    assert drop_fraction(749, 0.3, 750, "cosine") == pytest.approx(0.15 * (1 + math.cos(math.pi * 749 / 750)))


@pytest.mark.parametrize("schedule, mid", [("cosine", 0.15), ("linear", 0.15), ("constant", 0.3)])
def test_every_schedule_is_zero_from_the_horizon_on(schedule, mid):
    assert drop_fraction(50, 0.3, 100, schedule) == pytest.approx(mid)
    assert drop_fraction(100, 0.3, 100, schedule) == 0.0
    assert drop_fraction(1000, 0.3, 100, schedule) == 0.0


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(ValueError, match="'cosine', 'constant', 'linear'"):
        drop_fraction(0, 0.3, 100, "step")


def test_updates_happen_every_delta_t_after_step_zero_and_before_the_end():
    steps = [s for s in range(1000) if is_update_step(s, 100, 750)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]


def test_temperature_anneals_along_a_half_cosine_and_stays_at_the_end():
    assert cosine_anneal(0, 5.0, 0.05, 300) == 5.0
    assert cosine_anneal(150, 5.0, 0.05, 300) == pytest.approx((5.0 + 0.05) / 2)
    assert cosine_anneal(300, 5.0, 0.05, 300) == 0.05
    assert cosine_anneal(10_000, 5.0, 0.05, 300) == 0.05
    values = [cosine_anneal(s, 5.0, 0.05, 300) for s in range(301)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert cosine_anneal(0, 5.0, 0.05, 0) == 0.05
