import pytest
import torch
from hypothesis import given, strategies as st

from dst.candidates import (band_width, check_grow, exact_top, exact_top_per_row, gradient_scores,
                            sample_candidates, sample_in_rows, sample_weighted_distinct, sampling_weights)
from kernels.coords import sample_distinct


def _problem(out_f, in_f, tokens=5, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dy, x = torch.randn(tokens, out_f, generator=g), torch.randn(tokens, in_f, generator=g)
    active = sample_distinct(out_f * in_f, int(density * out_f * in_f), generator=g)
    return dy, x, active, g


@pytest.mark.parametrize("out_f, in_f, n", [(1, 63, 5), (17, 33, 40), (63, 123, 300), (40, 2, 10)])
@pytest.mark.parametrize("band", [1, 64, 1 << 16])
def test_exact_scan_finds_the_dense_top_among_inactive_entries(out_f, in_f, n, band):
    dy, x, active, _ = _problem(out_f, in_f)
    ref = (dy.double().t() @ x.double()).abs().reshape(-1)
    ref[active] = -1
    scores, flat = exact_top(dy, x, n, active, band)
    assert set(flat.tolist()) == set(torch.topk(ref, n).indices.tolist())
    assert torch.allclose(scores.double(), ref[flat], rtol=1e-5)


def test_exact_scan_without_exclusion_looks_at_every_entry():
    dy, x, _, _ = _problem(20, 30)
    ref = (dy.double().t() @ x.double()).abs().reshape(-1)
    _, flat = exact_top(dy, x, 50, None, 100)
    assert set(flat.tolist()) == set(torch.topk(ref, 50).indices.tolist())


def test_exact_scan_refuses_more_than_the_inactive_entries():
    dy, x, active, _ = _problem(4, 5, density=0.5)
    with pytest.raises(ValueError, match="eligible"):
        exact_top(dy, x, 20 - active.numel() + 1, active, 8)


@pytest.mark.parametrize("out_f, in_f, m", [(1, 63, 5), (17, 33, 4), (31, 90, 12)])
def test_per_row_scan_finds_each_rows_top_among_its_inactive_entries(out_f, in_f, m):
    dy, x, active, _ = _problem(out_f, in_f)
    ref = (dy.double().t() @ x.double()).abs()
    ref.view(-1)[active] = -1
    scores, cols = exact_top_per_row(dy, x, m, active, 64)
    expected = torch.topk(ref, m, dim=1)
    for r in range(out_f):
        assert set(cols[r].tolist()) == set(expected.indices[r].tolist())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all()), "best first"


def test_per_row_scan_marks_missing_entries_when_a_row_is_full():
    dy, x, _, _ = _problem(2, 4)
    active = torch.tensor([0, 1, 2])  # row 0 has one free column
    scores, cols = exact_top_per_row(dy, x, 2, active, 4)
    assert cols[0, 0] == 3 and cols[0, 1] == -1 and torch.isinf(scores[0, 1])


@pytest.mark.parametrize("rows, cols, elems", [(4096, 16384, 1 << 20), (3, 5, 1 << 22), (1, 1, 1 << 22)])
def test_a_band_never_spans_the_whole_matrix(rows, cols, elems):
    w = band_width(rows, cols, elems)
    assert 1 <= w <= max(1, (cols + 1) // 2)


@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 0.9), st.sampled_from(["uniform", "grabo", "graest"]),
       st.integers(0, 2**31 - 1))
def test_samplers_draw_exactly_n_distinct_inactive_entries(out_f, in_f, density, sampler, seed):
    dy, x, active, g = _problem(out_f, in_f, density=density, seed=seed % 1000)
    free = out_f * in_f - active.numel()
    n = free // 2
    cand = sample_candidates(sampler, n, out_f, in_f, active, dy, x, g)
    assert cand.numel() == n
    assert bool((cand.diff() > 0).all()), "sorted and distinct"
    assert not bool(torch.isin(cand, active).any()), "only inactive entries"
    assert bool((cand >= 0).all()) and bool((cand < out_f * in_f).all())


def test_grabo_never_draws_a_row_without_output_gradient_while_others_have_room():
    dy, x, _, g = _problem(40, 50, tokens=6)
    dy[:, :20] = 0.0
    active = torch.empty(0, dtype=torch.long)
    cand = sample_candidates("grabo", 200, 40, 50, active, dy, x, g)
    assert bool((cand // 50 >= 20).all())


def test_graest_weights_are_the_sketch_of_a_random_sign_vector():
    dy, x, _, _ = _problem(8, 9, tokens=7)
    row_w, col_w = sampling_weights("graest", dy, x, torch.Generator().manual_seed(3))
    signs = torch.randint(0, 2, (7,), generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    assert torch.allclose(row_w, (signs @ dy.double()).abs(), atol=1e-5)
    assert torch.allclose(col_w, (signs @ x.double()).abs(), atol=1e-5)


def test_weighted_sampling_fills_up_uniformly_when_the_weights_cover_too_few_entries():
    row_w, col_w = torch.zeros(10, dtype=torch.float64), torch.ones(10, dtype=torch.float64)
    row_w[0] = 1.0  # all weight on one row of 10 entries
    cand = sample_weighted_distinct(row_w, col_w, 30, torch.empty(0, dtype=torch.long), torch.Generator().manual_seed(0))
    assert cand.numel() == 30 and cand.unique().numel() == 30
    assert set(range(10)) <= set(cand.tolist()), "the weighted row is taken first"


@given(st.integers(1, 30), st.integers(2, 60), st.floats(0.0, 0.95), st.booleans(), st.integers(0, 1000))
def test_per_row_sampling_gives_each_row_exactly_its_count_of_free_entries(n_rows, in_f, density, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    active = sample_distinct(n_rows * in_f, int(density * n_rows * in_f), generator=g)
    free = in_f - torch.bincount(active // in_f, minlength=n_rows)
    counts = torch.randint(0, in_f + 1, (n_rows,), generator=g).minimum(free)
    col_w = torch.rand(in_f, generator=g, dtype=torch.float64) if weighted else None
    rows = torch.randperm(n_rows, generator=g)
    cand = sample_in_rows(rows, counts[rows], in_f, active, col_w, g)
    assert torch.equal(torch.bincount(cand // in_f, minlength=n_rows), counts)
    assert not bool(torch.isin(cand, active).any())
    assert cand.unique().numel() == cand.numel()


def test_gradient_scores_are_the_sddmm_at_the_coordinates():
    dy, x, _, _ = _problem(6, 7)
    flat = torch.tensor([0, 8, 41])
    ref = (dy.double().t() @ x.double()).abs().reshape(-1)[flat]
    assert torch.allclose(gradient_scores(dy, x, flat, 7).double(), ref, rtol=1e-5)


def test_unknown_grow_mode_lists_the_choices():
    with pytest.raises(ValueError, match="'exact', 'uniform', 'grabo', 'graest'"):
        check_grow("random")
    with pytest.raises(ValueError, match="'uniform', 'grabo', 'graest'"):
        sampling_weights("exact", torch.zeros(1, 1), torch.zeros(1, 1), torch.Generator())
