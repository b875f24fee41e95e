"""models/dropout.py: the CPU keep mask's rate, scale and repeatability; Dropout as nn.Dropout."""
import pytest
import torch
import torch.nn.functional as F

from models.dropout import FIELD, Dropout, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 1 / 3, 2 ** -16])
def test_the_drop_rate_is_p_to_16_bits_and_the_scale_its_inverse(p):
    torch.manual_seed(0)
    n = 3_000_001   # not a multiple of the four fields a word
    keep, scale = keep_mask((n,), p)
    q = round(p * FIELD) / FIELD
    assert abs(q - p) <= 2 ** -17 and scale == pytest.approx(1 / (1 - q), rel=1e-15)
    dropped = (~keep).double().mean().item()
    assert abs(dropped - q) < 5 * (q * (1 - q) / n) ** 0.5 + 1e-7   # 5 standard deviations


def test_each_of_the_four_fields_of_a_word_is_uniform():
    """Each 16-bit field of a word (elements 4i .. 4i + 3) drops at the rate asked - the top one
    too, whose top bit a 63-bit draw would leave at 0 (it would then never drop at p <= 0.5)."""
    torch.manual_seed(1)
    n = 4 * 300_000
    for p in (0.25, 0.5, 0.75):
        keep, _ = keep_mask((n,), p)
        for field in range(4):
            rate = (~keep[field::4]).double().mean().item()
            assert abs(rate - p) < 5 * (p * (1 - p) / (n // 4)) ** 0.5, (p, field, rate)


def test_the_mask_repeats_under_the_same_seed_and_changes_with_another():
    torch.manual_seed(5)
    a, _ = keep_mask((7, 11, 13), 0.3)
    torch.manual_seed(5)
    b, _ = keep_mask((7, 11, 13), 0.3)
    torch.manual_seed(6)
    c, _ = keep_mask((7, 11, 13), 0.3)
    assert a.shape == (7, 11, 13) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dropout_scales_the_kept_zeroes_the_rest_and_its_gradient_is_the_same_mask(dtype):
    torch.manual_seed(2)
    x = (torch.rand(64, 33, dtype=torch.float64) + 1).to(dtype).requires_grad_()
    torch.manual_seed(3)
    y = dropout(x, 0.25)
    torch.manual_seed(3)
    keep, scale = keep_mask(x.shape, 0.25)
    assert y.dtype == dtype
    assert torch.equal(y, torch.where(keep, x * scale, 0))
    g = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(keep, g * scale, 0))


def test_dropout_is_the_identity_in_eval_and_at_zero_and_zero_at_one():
    x = torch.randn(5, 6)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    m = Dropout(0.5).eval()
    assert m(x) is x and isinstance(m, torch.nn.Dropout) and m.p == 0.5


def test_the_module_drops_in_training_and_refuses_inplace():
    torch.manual_seed(4)
    y = Dropout(0.5)(torch.ones(1000))
    assert set(y.unique().tolist()) <= {0.0, 2.0} and 300 < int((y == 0).sum()) < 700
    with pytest.raises(ValueError, match="does not drop in place"):
        Dropout(0.5, inplace=True)


def test_a_bad_probability_is_refused_by_name():
    with pytest.raises(ValueError, match=r"dropout probability must lie in \[0, 1\), got 1.5"):
        keep_mask((3,), 1.5)
    with pytest.raises(ValueError, match="dropout probability"):
        keep_mask((3,), -0.1)


def test_the_mean_is_kept_as_torchs_dropout_keeps_it():
    torch.manual_seed(8)
    x = torch.ones(2_000_000, dtype=torch.float64)
    ours, torchs = dropout(x, 0.1).mean().item(), F.dropout(x, 0.1, True).mean().item()
    assert abs(ours - 1) < 5 * (0.1 / 0.9 / x.numel()) ** 0.5 and abs(torchs - 1) < 1e-2
