import math

import pytest
from hypothesis import given, strategies as st

from dst import layer_densities


def _overall(shapes, dens):
    total = sum(math.prod(s) for s in shapes.values())
    return sum(dens[n] * math.prod(s) for n, s in shapes.items()) / total


VIT_BLOCK = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}


def test_uniform_gives_every_layer_one_minus_sparsity():
    assert layer_densities(VIT_BLOCK, 0.9, "uniform") == {n: pytest.approx(0.1) for n in VIT_BLOCK}


@pytest.mark.parametrize("distribution", ["erk", "er"])
def test_erdos_renyi_density_is_proportional_to_in_plus_out_over_in_times_out(distribution):
    dens = layer_densities(VIT_BLOCK, 0.9, distribution)
    assert _overall(VIT_BLOCK, dens) == pytest.approx(0.1)
    score = {n: (o + i) / (o * i) for n, (o, i) in VIT_BLOCK.items()}
    ratios = {dens[n] / score[n] for n in VIT_BLOCK}
    assert max(ratios) == pytest.approx(min(ratios))
    assert dens["proj"] > dens["fc1"] == pytest.approx(dens["fc2"])


def test_a_layer_erk_would_push_above_one_is_made_dense_and_the_rest_rescaled():
    shapes = {"tiny": (4, 4), "big": (1024, 1024)}
    dens = layer_densities(shapes, 0.5, "erk")
    assert dens["tiny"] == 1.0
    assert _overall(shapes, dens) == pytest.approx(0.5)
    assert dens["big"] < 1.0


def test_er_and_erk_coincide_for_linear_layers_and_differ_for_convolutions():
    assert layer_densities(VIT_BLOCK, 0.8, "er") == layer_densities(VIT_BLOCK, 0.8, "erk")
    convs = {"conv1": (64, 3, 7, 7), "conv2": (128, 64, 3, 3), "fc": (10, 128)}
    assert layer_densities(convs, 0.9, "er") != layer_densities(convs, 0.9, "erk")


@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3),
                       st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=6),
       st.floats(0.0, 0.99), st.sampled_from(["uniform", "erk", "er"]))
def test_overall_density_is_one_minus_sparsity_and_no_layer_exceeds_one(shapes, sparsity, distribution):
    dens = layer_densities(shapes, sparsity, distribution)
    assert set(dens) == set(shapes)
    assert all(0.0 < d <= 1.0 for d in dens.values())
    assert _overall(shapes, dens) == pytest.approx(1.0 - sparsity, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2.0])
def test_sparsity_outside_zero_one_is_rejected(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        layer_densities(VIT_BLOCK, sparsity, "erk")


def test_unknown_distribution_lists_the_choices():
    with pytest.raises(ValueError, match="'uniform', 'erk', 'er'"):
        layer_densities(VIT_BLOCK, 0.9, "snip")


def test_bad_shape_names_the_layer():
    with pytest.raises(ValueError, match="fc1"):
        layer_densities({"fc1": (0, 3)}, 0.9, "erk")
