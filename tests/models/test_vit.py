"""models/vit.py and models/transformer.py: shapes, layer names given to the factory, presets,
and construction without any dense weight for a sparsified layer."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from models.transformer import sparse_layer_shapes
from models.vit import VIT_PRESETS, ViT, ViTConfig


class RecordAllocations(TorchDispatchMode):
    """Records the element count of every tensor an op returns (factories included)."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.devices = []
        self.ptrs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                self.devices.append(t.device.type)
                self.ptrs.append(t.data_ptr() if t.device.type != "meta" else 0)
        return out

    def largest(self) -> int:
        return max(math.prod(s) for s in self.shapes)


def sparse_factory(density=0.1, kind=kernels.SparseLinear):
    def linear(name, in_features, out_features, bias=True):
        return kind(in_features, out_features, density, bias=bias)
    return linear


def recording_factory(make):
    """(linear, largest): a factory that builds each layer with ``make`` and records in
    ``largest[name]`` the largest tensor building that one layer allocated."""
    largest = {}

    def linear(name, in_features, out_features, bias=True):
        with RecordAllocations() as rec:
            layer = make(name, in_features, out_features, bias)
        largest[name] = rec.largest()
        return layer
    return linear, largest


def test_vit_gives_logits_and_block_layer_names():
    torch.manual_seed(0)
    cfg = ViTConfig.preset("micro", depth=2)
    seen = []

    def linear(name, i, o, bias=True):
        seen.append((name, i, o))
        return torch.nn.Linear(i, o, bias)

    model = ViT(cfg, linear=linear)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert [s[0] for s in seen] == [f"blocks.{i}.{n}" for i in range(2)
                                    for n in ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2")]
    names = {n for n, _ in model.named_modules()}
    assert all(s[0] in names for s in seen), "factory names must be the module paths"
    assert seen[0][1:] == (32, 96) and seen[2][1:] == (32, 64) and seen[3][1:] == (64, 32)


def test_sparse_layer_shapes_allocates_nothing_and_matches_the_model():
    cfg = ViTConfig.preset("base")
    shapes = sparse_layer_shapes(ViT, cfg)
    assert len(shapes) == 48
    assert shapes["blocks.11.mlp.fc1"] == (3072, 768) and shapes["blocks.0.attn.qkv"] == (2304, 768)


@pytest.mark.parametrize("kind", [kernels.SparseLinear, kernels.FanInLinear, kernels.DiagLinear])
def test_vit_with_sparse_layers_never_allocates_a_dense_block_weight(kind):
    torch.manual_seed(0)
    cfg = ViTConfig.preset("tiny", dim=128, mlp_dim=512)   # smallest block weight: 128 x 128
    shapes = sparse_layer_shapes(ViT, cfg)
    linear, largest = recording_factory(sparse_factory(0.1, kind))
    model = ViT(cfg, linear=linear)
    assert set(largest) == set(shapes)
    assert all(largest[n] < 0.5 * o * i for n, (o, i) in shapes.items()), largest   # density 0.1 + sampling slack
    with RecordAllocations() as step:
        model(torch.randn(4, 1, 28, 28)).logsumexp(-1).sum().backward()
    dense_shapes = set(shapes.values()) | {(i, o) for o, i in shapes.values()}
    assert not dense_shapes & set(step.shapes), "a dense block weight (or its gradient) was formed"
    assert all(isinstance(model.get_submodule(n), kind) for n in shapes)


def test_vit_presets_cover_tiny_to_base_and_reject_unknown_names():
    assert {"micro", "tiny", "base"} <= set(VIT_PRESETS)
    b = ViTConfig.preset("base")
    assert (b.dim, b.depth, b.heads, b.mlp_dim, b.patch_size, b.image_size) == (768, 12, 12, 3072, 16, 224)
    with pytest.raises(ValueError, match="unknown ViT preset 'huge'"):
        ViTConfig.preset("huge")
    with pytest.raises(ValueError, match="patch_size=5 must divide image_size=28"):
        ViT(ViTConfig.preset("micro", patch_size=5))
    with pytest.raises(ValueError, match="heads=3 must divide dim=32"):
        ViT(ViTConfig.preset("micro", heads=3))
