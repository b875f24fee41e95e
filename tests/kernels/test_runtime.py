"""kernels.runtime's explicit hooks: config overrides (what bench/sweep.py runs candidates
through), NaN-poisoned fresh outputs, the power-of-two buckets of the config tables."""
import math

import pytest
import torch

from kernels import runtime as rt


def test_config_override_decides_first_and_none_falls_through():
    default = {"BLOCK": 16, "num_warps": 4}
    with rt.config_override(lambda kernel, key, d: {**d, "BLOCK": 64} if kernel == "a" else None):
        assert rt.launch_config("a", {"T": 8}, default) == {"BLOCK": 64, "num_warps": 4}
        assert rt.launch_config("b", {"T": 8}, default) == default       # None: the table / default
        with rt.config_override(lambda kernel, key, d: {"BLOCK": 128}):
            assert rt.launch_config("a", {"T": 8}, default) == {"BLOCK": 128}   # innermost first
        assert rt.launch_config("a", {"T": 8}, default)["BLOCK"] == 64
    assert rt.launch_config("a", {"T": 8}, default) == default


def test_config_override_is_closed_by_an_exception():
    with pytest.raises(RuntimeError):
        with rt.config_override(lambda *a: {"X": 1}):
            raise RuntimeError
    assert rt.launch_config("a", {}, {"X": 0}) == {"X": 0}


def test_poisoned_empty_fills_floats_with_nan_and_restores_torch():
    empty, empty_like = torch.empty, torch.empty_like
    with rt.poisoned_empty():
        assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
        assert torch.empty(3, dtype=torch.int32).dtype == torch.int32   # integers untouched
    assert torch.empty is empty and torch.empty_like is empty_like


@pytest.mark.parametrize("n, want", [(1, 1), (2, 2), (3, 4), (64, 64), (65, 128)])
def test_next_pow2_is_the_tables_shape_bucket(n, want):
    assert rt.next_pow2(n) == rt.shape_bucket(n) == want
    assert want >= n and (want == 1 or want // 2 < n) and math.log2(want).is_integer()


def test_acc_dtype_is_fp64_only_for_fp64():
    assert rt.acc_dtype(torch.float64) == torch.float64
    assert all(rt.acc_dtype(d) == torch.float32 for d in (torch.float32, torch.bfloat16, torch.float16))
