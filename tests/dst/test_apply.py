import pytest
import torch

import kernels
from dst.apply import apply_mask_update, remap_parameter

from .helpers import entries, state_entries


def _layer_and_adam(seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = kernels.SparseLinear(12, 10, density=0.3, generator=g)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    layer(torch.randn(5, 12, generator=g)).square().sum().backward()
    opt.step()
    return layer, opt


def _drop_first_grow(layer, n_drop, grow_flat):
    """Drop the first n_drop stored weights, grow grow_flat (sorted, inactive)."""
    old = layer.flat_coords()
    kept = torch.arange(n_drop, old.numel())
    flat = torch.cat([old[kept], grow_flat])
    src = torch.cat([kept, torch.full((grow_flat.numel(),), -1)])
    order = torch.argsort(flat)
    flat, src = flat[order], src[order]
    return src, (flat // layer.in_features).int(), (flat % layer.in_features).int()


def test_kept_weights_keep_value_and_adam_moments_and_grown_ones_start_at_zero():
    layer, opt = _layer_and_adam()
    before, m_before, v_before = entries(layer), state_entries(layer, opt, "exp_avg"), state_entries(layer, opt, "exp_avg_sq")
    active = set(before)
    free = [r * 12 + c for r in range(10) for c in range(12) if (r, c) not in active][:3]
    values = layer.values
    src, rows, cols = _drop_first_grow(layer, 3, torch.tensor(free))
    stats = apply_mask_update(layer, opt, src, rows=rows, cols=cols)
    assert layer.values is values, "the optimizer's Parameter object stays valid"
    assert stats == {"kept": len(before) - 3, "dropped": 3, "grown": 3}
    after, m_after, v_after = entries(layer), state_entries(layer, opt, "exp_avg"), state_entries(layer, opt, "exp_avg_sq")
    for key in set(before) & set(after):
        assert (after[key], m_after[key], v_after[key]) == (before[key], m_before[key], v_before[key])
    for f in free:
        key = (f // 12, f % 12)
        assert (after[key], m_after[key], v_after[key]) == (0.0, 0.0, 0.0)
    assert layer.values.grad is None


def test_sgd_momentum_buffer_is_remapped_and_changes_shape_with_the_pattern():
    g = torch.Generator().manual_seed(0)
    layer = kernels.FanInLinear(16, 6, k=4, generator=g)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(3, 16, generator=g)).sum().backward()
    opt.step()
    old = opt.state[layer.values]["momentum_buffer"].clone()
    # Ablate neurons 1..5 and give neuron 0 two more weights: [1, 6].
    keep_cols = layer.indices[0].tolist()
    free = [c for c in range(16) if c not in keep_cols][:2]
    cols = sorted(keep_cols + free)
    src = torch.tensor([keep_cols.index(c) if c in keep_cols else -1 for c in cols])
    apply_mask_update(layer, opt, src, indices=torch.tensor([cols], dtype=torch.int32),
                      rows=torch.tensor([0], dtype=torch.int32))
    buf = opt.state[layer.values]["momentum_buffer"]
    assert buf.shape == (1, 6) == layer.values.shape
    for j, c in enumerate(cols):
        expected = old[0, keep_cols.index(c)] if c in keep_cols else 0.0
        assert buf[0, j] == expected
    opt.step()  # the optimizer runs on the new shape


def test_a_shape_change_while_the_last_graph_is_alive_does_not_break_the_next_backward():
    g = torch.Generator().manual_seed(0)
    layer = kernels.FanInLinear(16, 6, k=4, generator=g)
    loss = layer(torch.randn(3, 16, generator=g)).sum()
    loss.backward()  # `loss` (and its graph) stays alive, as in a training loop
    src = torch.arange(5 * 4)
    apply_mask_update(layer, None, src, indices=layer.indices[:5].clone(), rows=layer.rows[:5].clone())
    layer(torch.randn(3, 16, generator=g)).sum().backward()
    assert layer.values.grad.shape == (5, 4)


def test_src_that_keeps_an_element_twice_or_points_outside_is_rejected():
    layer, opt = _layer_and_adam()
    n = layer.nnz()
    with pytest.raises(ValueError, match="twice"):
        remap_parameter(layer.values, opt, torch.zeros(n, dtype=torch.long), (n,))
    with pytest.raises(ValueError, match="past"):
        remap_parameter(layer.values, opt, torch.full((n,), n), (n,))


def test_unsorted_coordinates_are_rejected_before_anything_changes():
    layer, opt = _layer_and_adam()
    rows, cols = layer.rows.flip(0), layer.cols.flip(0)
    before = layer.values.detach().clone()
    with pytest.raises(ValueError, match="sorted"):
        apply_mask_update(layer, opt, torch.arange(layer.nnz()).flip(0), rows=rows, cols=cols)
    assert torch.equal(layer.values.detach(), before)
