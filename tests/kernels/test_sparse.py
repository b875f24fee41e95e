"""kernels/sparse.py: unstructured coordinates (torch.sparse CSR forward, SDDMM weight grad)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernels
from kernels.coords import sample_distinct
from kernels.sparse import sparse_matmul_ref

from .conftest import DEVICE, check_op


@st.composite
def sparse_cases(draw):
    n_in, n_out = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    nnz = draw(st.integers(0, n_in * n_out))
    return n_in, n_out, nnz, draw(st.integers(1, 30)), draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])), draw(st.integers(0, 2 ** 16))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sparse_cases())
def test_sparse_matches_dense_reference_with_gradients(backend, case):
    n_in, n_out, nnz, T, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    flat = sample_distinct(n_in * n_out, nnz, generator=g)
    perm = torch.randperm(nnz, generator=g)  # any order
    rows = (flat[perm] // n_in).to(torch.int32).to(DEVICE)
    cols = (flat[perm] % n_in).to(torch.int32).to(DEVICE)
    values, x = torch.randn(nnz, generator=g), torch.randn(T, n_in, generator=g)
    check_op(lambda x, v: kernels.sparse_matmul(x, v, rows, cols, n_out),
             lambda x, v: sparse_matmul_ref(x, v, rows, cols, n_out),
             [x.to(DEVICE), values.to(DEVICE)], dtype)


def test_sample_distinct_draws_distinct_values_outside_exclude():
    g = torch.Generator().manual_seed(0)
    exclude = torch.tensor([0, 3, 4, 9], dtype=torch.int64)
    got = sample_distinct(10, 6, exclude=exclude, generator=g)
    assert got.tolist() == [1, 2, 5, 6, 7, 8]
    big = sample_distinct(10 ** 12, 1000, generator=g)
    assert big.unique().numel() == 1000
    with pytest.raises(ValueError, match="cannot draw"):
        sample_distinct(10, 7, exclude=exclude)


def test_layer_is_sorted_exact_and_round_trips():
    torch.manual_seed(0)
    layer = kernels.SparseLinear(50, 40, density=0.1)
    assert layer.nnz() == 200 and layer.mask().sum() == 200
    flat = layer.flat_coords()
    assert torch.all(flat.diff() > 0)
    x = torch.randn(3, 50)
    torch.testing.assert_close(layer(x), x @ layer.to_dense().t() + layer.bias, rtol=1e-5, atol=1e-5)
    other = kernels.SparseLinear(50, 40, nnz=7)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), layer(x))


def test_from_dense_keeps_zero_weights_inside_the_mask():
    w = torch.randn(5, 7)
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    w[mask.nonzero()[0, 0], mask.nonzero()[0, 1]] = 0.0
    layer = kernels.SparseLinear.from_dense(w, mask)
    assert torch.equal(layer.mask(), mask)
    torch.testing.assert_close(layer.to_dense(), w * mask)


def test_to_linear_gives_the_same_function():
    torch.manual_seed(0)
    for layer in (kernels.SparseLinear(20, 12, 0.3), kernels.FanInLinear(20, 12, 0.3),
                  kernels.DiagLinear(20, 12, 0.5, block_size=4)):
        x = torch.randn(3, 20)
        torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)
