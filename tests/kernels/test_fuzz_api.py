"""Fuzz the public ops with random, often wrong, arguments: each call either raises a clear
error (TypeError / ValueError naming an argument) or returns exactly what the dense reference
computes. Never a crash, a hang or a silently wrong result."""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

import kernels
from kernels.diag import diag_matmul_ref
from kernels.fanin import fanin_matmul_ref
from kernels.sddmm import sddmm_ref
from kernels.sparse import sparse_matmul_ref

# Each argument is right most of the time, so that many calls are valid and get checked
# against the reference, and wrong in one of several ways otherwise.
DTYPES = [torch.float32] * 6 + [torch.float64, torch.float16, torch.int32, torch.int64]
INDEX_DTYPES = [torch.int32] * 8 + [torch.int64, torch.float32]
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tensor(draw, shape, dtype, lo=-3, hi=8):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def small_shape(draw, ndim):
    return tuple(draw(st.integers(0, 6)) for _ in range(ndim))


def run_or_clear_error(fn, ref, names):
    try:
        out = fn()
    except (TypeError, ValueError) as e:
        msg = str(e)
        assert any(n in msg for n in names), f"error does not name an argument: {msg}"
        event("clear error")
        return
    event("computed")
    expected = ref()
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected.double(), rtol=2e-2, atol=2e-2)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    with kernels.use_backend(request.param):
        yield


@FUZZ
@given(data=st.data())
def test_fanin_matmul_fuzz(backend, data):
    d = data.draw
    n_in = d(st.integers(0, 7))
    x = tensor(d, small_shape(d, d(st.integers(0, 2))) + (n_in,), d(st.sampled_from(DTYPES)))
    k = d(st.integers(0, n_in + 1))
    vshape = (d(st.integers(0, 6)), k) if d(st.integers(0, 9)) else small_shape(d, d(st.sampled_from([1, 3])))
    values = tensor(d, vshape, d(st.sampled_from([x.dtype] * 5 + [torch.float32])))
    ishape = vshape if d(st.integers(0, 9)) else small_shape(d, 2)
    if d(st.integers(0, 4)) and len(ishape) == 2 and ishape[1] <= n_in:  # distinct columns per row
        g = torch.Generator().manual_seed(d(st.integers(0, 999)))
        indices = torch.stack([torch.randperm(n_in, generator=g)[:ishape[1]] for _ in range(ishape[0])]
                              or [torch.empty(0, ishape[1], dtype=torch.int64)]).reshape(ishape)
        indices = indices.to(d(st.sampled_from(INDEX_DTYPES)))
    else:
        indices = tensor(d, ishape, d(st.sampled_from(INDEX_DTYPES)), -1, n_in + 2)
    rows = None
    if d(st.booleans()) and len(vshape) >= 1:
        rows = torch.randperm(9, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))[:vshape[0]]
        rows = rows.to(torch.int32) if d(st.integers(0, 5)) else rows
    out_features = d(st.sampled_from([None, None, 4, 9]))

    w_out = out_features if out_features is not None else values.shape[0]
    run_or_clear_error(lambda: kernels.fanin_matmul(x, values, indices, rows, out_features),
                       lambda: fanin_matmul_ref(x.double(), values.double(), indices, rows, w_out),
                       ["x", "values", "indices", "rows", "out_features"])


@FUZZ
@given(data=st.data())
def test_diag_matmul_fuzz(backend, data):
    d = data.draw
    b = d(st.sampled_from([1, 1, 2, 4, 4, 0]))
    bb = max(b, 1)
    n_in = d(st.integers(1, 4)) * bb + (0 if d(st.integers(0, 5)) else 1)
    out_features = d(st.sampled_from([None, None, 4, 8, 6]))
    R = (out_features or 4) // bb
    C = n_in // bb
    D, P = min(R, C), max(R, C, 1)
    x = tensor(d, (d(st.integers(0, 4)), n_in), d(st.sampled_from(DTYPES)))
    K = d(st.integers(0, P))
    vshape = (K, D, bb, bb) if d(st.integers(0, 5)) else small_shape(d, 4)
    values = tensor(d, vshape, d(st.sampled_from([x.dtype] * 5 + [torch.float32])))
    if d(st.integers(0, 4)):
        offsets = torch.randperm(P, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))[:vshape[0] if vshape else 0]
        offsets = offsets.to(d(st.sampled_from(INDEX_DTYPES)))
    else:
        offsets = tensor(d, (d(st.integers(0, 3)),), d(st.sampled_from(INDEX_DTYPES)), -1, P + 2)

    run_or_clear_error(lambda: kernels.diag_matmul(x, values, offsets, b, out_features),
                       lambda: diag_matmul_ref(x.double(), values.double(), offsets, b, out_features),
                       ["x", "values", "offsets", "block_size", "out_features"])


@FUZZ
@given(data=st.data())
def test_sparse_matmul_and_sddmm_fuzz(backend, data):
    d = data.draw
    n_in = d(st.integers(0, 6))
    x = tensor(d, (d(st.integers(0, 5)), n_in), d(st.sampled_from(DTYPES)))
    n = d(st.integers(0, 6))
    out_features = d(st.integers(1, 6))
    values = tensor(d, (n if d(st.integers(0, 5)) else d(st.integers(0, 6)),), d(st.sampled_from([x.dtype] * 5 + [torch.float32])))
    rows = tensor(d, (n,), d(st.sampled_from(INDEX_DTYPES)), 0 if d(st.integers(0, 5)) else -1, out_features)
    cols = tensor(d, (n if d(st.integers(0, 5)) else d(st.integers(0, 6)),), d(st.sampled_from(INDEX_DTYPES)),
                  0 if d(st.integers(0, 5)) else -1, max(n_in, 1) + (0 if d(st.integers(0, 5)) else 2))
    # Repeated coordinates are outside sparse_matmul's contract (the layer keeps them distinct):
    # the fuzz only feeds distinct ones to it.
    distinct = rows.numel() == cols.numel() and len({(int(r), int(c)) for r, c in zip(rows, cols)}) == rows.numel()
    if distinct:
        run_or_clear_error(lambda: kernels.sparse_matmul(x, values, rows, cols, out_features),
                           lambda: sparse_matmul_ref(x.double(), values.double(), rows, cols, out_features),
                           ["x", "values", "rows", "cols", "out_features"])
    dy = tensor(d, (x.shape[0] if d(st.integers(0, 5)) else d(st.integers(0, 5)), out_features),
                d(st.sampled_from([x.dtype] * 5 + [torch.float32])))
    run_or_clear_error(lambda: kernels.sddmm(dy, x, rows, cols),
                       lambda: sddmm_ref(dy.double(), x.double(), rows, cols),
                       ["dy", "x", "rows", "cols", "block_size"])
