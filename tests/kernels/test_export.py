"""kernels/export.py: condensed safetensors round trips, dense conversion, explicit masks."""
import pytest
import torch
from torch import nn

import kernels


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.fan = kernels.FanInLinear(32, 48, k=5)
        self.diag = kernels.DiagLinear(48, 32, num_diagonals=2, block_size=8)
        self.sp = kernels.SparseLinear(32, 10, density=0.2, bias=False)

    def forward(self, x):
        return self.sp(torch.relu(self.diag(torch.relu(self.fan(self.embed(x))))))


def test_condensed_file_round_trips_into_a_fresh_model(tmp_path):
    torch.manual_seed(0)
    net = Net()
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(32, generator=g)[:7] for _ in range(20)]).to(torch.int32)
    net.fan.set_pattern(torch.randn(20, 7), idx, torch.arange(0, 40, 2, dtype=torch.int32))  # ablated, k = 7
    path = tmp_path / "net.safetensors"
    kernels.save_condensed(net, path, extra={"acc": 0.5})
    torch.manual_seed(5)
    fresh = Net()
    assert kernels.load_into(fresh, path) == {"acc": 0.5}
    x = torch.randn(4, 12)
    assert torch.equal(fresh(x), net(x))


def test_layers_rebuild_without_the_model_code(tmp_path):
    torch.manual_seed(0)
    net = Net()
    net.diag.enable_gate(k_target=1, temperature=0.5, scores=torch.tensor([1.0, -1.0]))
    kernels.save_condensed(net, tmp_path / "n.safetensors")
    layers, header = kernels.load_layers(tmp_path / "n.safetensors")
    assert sorted(layers) == ["diag", "fan", "sp"]
    x = torch.randn(3, 32)
    assert torch.equal(layers["fan"](x), net.fan(x))
    assert torch.equal(layers["sp"](x), net.sp(x))
    assert torch.equal(layers["diag"](net.fan(x)), net.diag(net.fan(x)))


def test_file_holds_no_dense_weight(tmp_path):
    layer = kernels.SparseLinear(1000, 1000, density=0.01)
    kernels.save_condensed(layer, tmp_path / "l.safetensors")
    tensors, _ = kernels.export.read_condensed(tmp_path / "l.safetensors")
    assert max(t.numel() for t in tensors.values()) < 1000 * 1000 // 10


def test_densify_gives_linear_layers_with_the_same_function():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 12)
    y = net(x)
    kernels.densify(net)
    assert not any(isinstance(m, kernels.SparseLayer) for m in net.modules())
    torch.testing.assert_close(net(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["sparse", "fanin", "diag"])
def test_dense_weights_load_into_sparse_layers_with_an_explicit_pattern(fmt):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    if fmt == "diag":
        pattern = torch.tensor([0, 1], dtype=torch.int32)
    else:
        pattern = torch.zeros(8, 16, dtype=torch.bool)
        pattern[:, :4] = True
    layer = kernels.sparse_from_dense(lin, fmt, pattern, block_size=4)
    m = layer.mask()
    torch.testing.assert_close(layer.to_dense(), lin.weight.detach() * m)
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), x @ (lin.weight * m).t() + lin.bias)


def test_a_corrupt_or_foreign_file_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        kernels.load_layers(bad)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="no alwayssparse metadata"):
        kernels.load_layers(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="no condensed model"):
        kernels.load_layers(tmp_path / "missing.safetensors")


def test_a_mismatched_model_is_refused(tmp_path):
    torch.manual_seed(0)
    kernels.save_condensed(Net(), tmp_path / "n.safetensors")
    other = nn.Sequential(kernels.SparseLinear(12, 4, 0.5))
    with pytest.raises(ValueError, match="holds sparse layers"):
        kernels.load_into(other, tmp_path / "n.safetensors")


def test_each_layer_class_carries_its_format_and_pattern():
    """The facts dst, export and the trainers read from a layer class: its format name (the
    registry SparseLayer.by_format), its pattern buffers and the values shape of a pattern."""
    assert kernels.SparseLayer.by_format == {"fanin": kernels.FanInLinear, "sparse": kernels.SparseLinear,
                                             "diag": kernels.DiagLinear}
    g = torch.Generator().manual_seed(0)
    layers = [kernels.FanInLinear(12, 8, 0.25, generator=g), kernels.SparseLinear(12, 8, 0.25, generator=g),
              kernels.DiagLinear(12, 8, 0.5, block_size=4, generator=g)]
    for layer in layers:
        assert set(layer.pattern()) == set(layer.pattern_buffers)
        assert all(name in dict(layer.named_buffers()) for name in layer.pattern_buffers)
        assert layer.values_shape(**layer.pattern()) == tuple(layer.values.shape), type(layer).__name__
    assert kernels.DiagLinear.options == ("block_size",)
