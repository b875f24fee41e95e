"""Small models and snapshots shared by the dst tests."""
from __future__ import annotations

import torch
from torch import nn

import dst


def tiny_model(cfg: dst.DSTConfig, sizes=(24, 40, 12), density=0.3, seed=0) -> nn.Sequential:
    """Two layers of the method's format with a ReLU between; fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(dst.make_layer(cfg, sizes[0], sizes[1], density, generator=g), nn.ReLU(),
                         dst.make_layer(cfg, sizes[1], sizes[2], density, generator=g))


def batch(step: int, in_features=24, out_features=12, tokens=16, seed=0):
    """A regression batch from a fixed random teacher, the same for a given step."""
    teacher = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1000 + seed))
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(seed * 7919 + step))
    return x, torch.tanh(x @ teacher.t())


def fit(model, sparsifier, optimizer, step, **batch_kw) -> float:
    """One optimizer step on batch(step) under the sparsifier's capture, no mask update; the loss."""
    x, y = batch(step, **batch_kw)
    with sparsifier.capture(step):
        loss = (model(x) - y).square().mean()
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def train_step(model, sparsifier, optimizer, step, **batch_kw):
    """fit, then the sparsifier's step: (loss, the update's stats or None)."""
    return fit(model, sparsifier, optimizer, step, **batch_kw), sparsifier.step(step, optimizer)


def entries(layer) -> dict[tuple[int, int], float]:
    """(row, col) -> stored value, through coords() (no dense weight)."""
    rows, cols = layer.coords()
    values = layer.values.detach().reshape(-1)
    return {(int(r), int(c)): float(v) for r, c, v in zip(rows.tolist(), cols.tolist(), values.tolist())}


def state_entries(layer, optimizer, key: str) -> dict[tuple[int, int], float]:
    """(row, col) -> optimizer state ``key`` of the stored value."""
    rows, cols = layer.coords()
    state = optimizer.state[layer.values][key].reshape(-1)
    return {(int(r), int(c)): float(v) for r, c, v in zip(rows.tolist(), cols.tolist(), state.tolist())}


def dense_grad(layer, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dL/dW of a small layer in fp64: the test's reference for grow scores."""
    return dy.double().t() @ x.double()


def check_swap(before: dict, after: dict, before_m: dict, after_m: dict, stats: dict) -> tuple[set, set]:
    """The invariants every mask update keeps; returns (dropped, grown) coordinates."""
    dropped = set(before) - set(after)
    grown = set(after) - set(before)
    assert stats["dropped"] == len(dropped) and stats["grown"] == len(grown)
    assert stats["kept"] == len(set(before) & set(after))
    for key in set(before) & set(after):  # kept: value and moments untouched (so never dropped and regrown)
        assert after[key] == before[key]
        assert after_m[key] == before_m[key]
    for key in grown:
        assert after[key] == 0.0, "a grown weight starts at exactly 0"
        assert after_m[key] == 0.0, "a grown weight's optimizer state starts at 0"
    return dropped, grown
