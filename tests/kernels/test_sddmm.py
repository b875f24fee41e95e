"""kernels/sddmm.py: the sampled product behind every weight gradient and growth score."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import kernels
from kernels.sddmm import sddmm_ref

from .conftest import DEVICE, assert_matches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def sddmm_cases(draw):
    b = draw(st.sampled_from([1, 1, 2, 16]))
    M, N = draw(st.integers(1, 9)) * b, draw(st.integers(1, 9)) * b
    n = draw(st.integers(0, 80))
    T = draw(st.integers(1, 70))
    return b, M, N, n, T, draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2 ** 16))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sddmm_cases())
def test_sddmm_matches_dense_product_at_any_coordinates(backend, case):
    b, M, N, n, T, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    dy, x = torch.randn(T, M, generator=g).to(dtype), torch.randn(T, N, generator=g).to(dtype)
    # unsorted, with repeats: drawn with replacement
    rows = torch.randint(0, M // b, (n,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, N // b, (n,), generator=g, dtype=torch.int32)
    dy, x, rows, cols = dy.to(DEVICE), x.to(DEVICE), rows.to(DEVICE), cols.to(DEVICE)
    out = kernels.sddmm(dy, x, rows, cols, b)
    lowp = sddmm_ref(dy, x, rows, cols, b) if dtype != torch.float32 else None
    assert_matches(out, sddmm_ref(dy.double(), x.double(), rows, cols, b), lowp)


def test_empty_coordinate_list_gives_empty_result(backend):
    dy, x = torch.randn(4, 6, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    e = torch.empty(0, dtype=torch.int32, device=DEVICE)
    assert kernels.sddmm(dy, x, e, e).shape == (0,)
    assert kernels.sddmm(dy, x, e, e, 2).shape == (0, 2, 2)


def test_repeated_coordinates_give_equal_entries(backend):
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(9, 6, generator=g), torch.randn(9, 8, generator=g)
    rows = torch.tensor([2, 2, 2, 5], dtype=torch.int32)
    cols = torch.tensor([7, 7, 7, 0], dtype=torch.int32)
    out = kernels.sddmm(dy, x, rows, cols)
    assert out[0] == out[1] == out[2]
    torch.testing.assert_close(out, sddmm_ref(dy, x, rows, cols), rtol=1e-5, atol=1e-5)


def test_noncontiguous_and_batched_inputs(backend):
    g = torch.Generator().manual_seed(0)
    dy = torch.randn(6, 2, 5, generator=g).transpose(0, 1)  # [2, 6, 5] non-contiguous
    x = torch.randn(2, 6, 7, generator=g)
    rows = torch.tensor([0, 4, 3], dtype=torch.int32)
    cols = torch.tensor([6, 0, 2], dtype=torch.int32)
    out = kernels.sddmm(dy, x, rows, cols)
    torch.testing.assert_close(out, sddmm_ref(dy.reshape(-1, 5), x.reshape(-1, 7), rows, cols), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 4, 16])
def test_block_form_equals_element_form_summed_over_the_block(backend, b):
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(5, 2 * b, generator=g), torch.randn(5, 3 * b, generator=g)
    rows, cols = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([2, 2], dtype=torch.int32)
    blocks = kernels.sddmm(dy, x, rows, cols, b)
    i = torch.arange(b)
    er = (rows[:, None, None] * b + i[:, None]).expand(2, b, b).reshape(-1).to(torch.int32)
    ec = (cols[:, None, None] * b + i[None, :]).expand(2, b, b).reshape(-1).to(torch.int32)
    torch.testing.assert_close(blocks.reshape(-1), kernels.sddmm(dy, x, er, ec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 2, 16])
def test_token_split_partial_sums_meet_exactly(monkeypatch, b):
    """Force several token chunks per coordinate: the atomic (SPLIT_T) path must agree."""
    from kernels import runtime as rt
    from kernels.sddmm import sddmm_fwd

    real = rt.launch_config
    monkeypatch.setattr(rt, "launch_config",
                        lambda kernel, key, default, device=None: dict(real(kernel, key, default, device),
                                                                       BLOCK_T=16, T_CHUNK=16))
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(70, 3 * b, generator=g).to(DEVICE), torch.randn(70, 2 * b, generator=g).to(DEVICE)
    rows = torch.tensor([0, 2, 1, 2], dtype=torch.int32, device=DEVICE)
    cols = torch.tensor([1, 0, 1, 1], dtype=torch.int32, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        out = sddmm_fwd(dy.to(dtype), x.to(dtype), rows, cols, b)
        lowp = sddmm_ref(dy.to(dtype), x.to(dtype), rows, cols, b) if dtype != torch.float32 else None
        assert_matches(out, sddmm_ref(dy.to(dtype).double(), x.to(dtype).double(), rows, cols, b), lowp)


@pytest.mark.parametrize("x_t", [0, 1])
def test_token_contiguous_copies_give_the_same_sums(monkeypatch, x_t):
    """X_T = 1 (the GPU default) reads dy and x through token-contiguous copies."""
    from kernels import runtime as rt
    from kernels.sddmm import sddmm_fwd

    real = rt.launch_config
    monkeypatch.setattr(rt, "launch_config", lambda kernel, key, default, device=None: dict(
        real(kernel, key, default, device), **({"X_T": x_t, "BLOCK_T": 16, "T_CHUNK": 32} if kernel == "sddmm" else {})))
    g = torch.Generator().manual_seed(1)
    dy, x = torch.randn(75, 9, generator=g).to(DEVICE), torch.randn(75, 13, generator=g).to(DEVICE)
    rows = torch.tensor([0, 8, 3, 3, 5], dtype=torch.int32, device=DEVICE)
    cols = torch.tensor([12, 0, 4, 7, 4], dtype=torch.int32, device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        out = sddmm_fwd(dy.to(dtype), x.to(dtype), rows, cols)
        lowp = sddmm_ref(dy.to(dtype), x.to(dtype), rows, cols) if dtype != torch.float32 else None
        assert_matches(out, sddmm_ref(dy.to(dtype).double(), x.to(dtype).double(), rows, cols), lowp)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 63, 64, 123])
def test_element_sddmm_whole_and_ragged_token_chunks(monkeypatch, T, dtype):
    """Token chunks of 32 in tiles of 16: T = 64 takes the unmasked (EVEN_T) loop, the others
    the masked one; 63 and 123 coordinates leave a ragged coordinate tile."""
    from kernels import runtime as rt
    from kernels.sddmm import sddmm_fwd

    real = rt.launch_config
    monkeypatch.setattr(rt, "launch_config", lambda kernel, key, default, device=None: dict(
        real(kernel, key, default, device), **({"BLOCK_T": 16, "T_CHUNK": 32} if kernel == "sddmm" else {})))
    g = torch.Generator().manual_seed(T)
    dy, x = torch.randn(T, 63, generator=g).to(dtype), torch.randn(T, 123, generator=g).to(dtype)
    n = 63 if T % 2 else 123
    rows = torch.randint(0, 63, (n,), generator=g, dtype=torch.int32)
    cols = torch.randint(0, 123, (n,), generator=g, dtype=torch.int32)
    out = sddmm_fwd(dy.to(DEVICE), x.to(DEVICE), rows.to(DEVICE), cols.to(DEVICE)).cpu()
    lowp = sddmm_ref(dy, x, rows, cols) if dtype == torch.bfloat16 else None
    assert_matches(out, sddmm_ref(dy.double(), x.double(), rows, cols), lowp)
