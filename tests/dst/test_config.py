import dataclasses
import inspect

import pytest

import dst
from dst.config import DSTConfig


def test_methods_and_layer_formats_cover_each_other():
    assert set(dst.LAYER_FORMAT) == set(dst.METHODS)
    assert set(dst.LAYER_FORMAT.values()) == {"dense", "sparse", "fanin", "diag"}
    assert set(dst.RULES) == set(dst.METHODS)


def test_default_config_is_valid_and_every_field_is_commented():
    assert DSTConfig().validate() == DSTConfig()
    source = inspect.getsource(DSTConfig)
    for f in dataclasses.fields(DSTConfig):
        line = next(line for line in source.splitlines() if line.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"field {f.name} has no comment"


@pytest.mark.parametrize("field, value, choices", [
    ("method", "magnitude", dst.METHODS),
    ("grow", "importance", ("exact", "uniform", "grabo", "graest")),
    ("distribution", "snip", ("uniform", "erk", "er")),
    ("drop_schedule", "step", ("cosine", "constant", "linear")),
    ("scope", "block", ("layer", "global")),
])
def test_unknown_choice_names_the_field_and_lists_the_choices(field, value, choices):
    with pytest.raises(ValueError) as err:
        DSTConfig(**{field: value}).validate()
    message = str(err.value)
    assert field in message and repr(value) in message
    for choice in choices:
        assert repr(choice) in message


@pytest.mark.parametrize("field, value", [
    ("sparsity", -0.1), ("sparsity", 1.0), ("sparsity", 1.5), ("sparsity", "0.9"),
    ("gamma_sal", -0.01), ("gamma_sal", 1.2),
    ("temp_start", 0.0), ("temp_start", -1.0), ("temp_end", 0.0), ("temp_end", 6.0),
    ("alpha", 1.5), ("t_end", 0.0), ("freeze_at", 1.1), ("gamma", 0.0), ("candidates", -1.0),
    ("delta_t", 0), ("delta_t", 2.5), ("block_size", 0), ("seed", -1), ("ablation", "yes"),
])
def test_out_of_range_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DSTConfig(**{field: value}).validate()


def test_sparsity_zero_is_allowed():
    DSTConfig(sparsity=0.0).validate()


def test_for_method_applies_the_paper_defaults_then_overrides():
    gse = DSTConfig.for_method("gse")
    assert (gse.delta_t, gse.alpha, gse.distribution, gse.grow) == (1000, 0.2, "er", "uniform")
    assert DSTConfig.for_method("srigl", gamma_sal=0.3).gamma_sal == 0.3
    with pytest.raises(ValueError, match="method"):
        DSTConfig.for_method("lottery")


def test_rule_for_an_unknown_method_lists_the_choices():
    with pytest.raises(ValueError) as err:
        dst.rule_for("snip")
    assert all(repr(m) in str(err.value) for m in dst.METHODS)
