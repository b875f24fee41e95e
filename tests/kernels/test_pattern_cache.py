"""kernels.runtime.cached_pattern: the CPU paths keep a pattern's derived structure (sorts, row
pointers) while the same, unchanged index tensors come back - and never serve a stale one."""
import gc

import torch

import kernels
from kernels import runtime as rt
from kernels.diag import diag_matmul_ref
from kernels.sparse import sparse_matmul_ref


def test_hits_only_for_the_same_unchanged_tensors_and_extra():
    builds = []

    def build():
        builds.append(1)
        return len(builds)

    a, b = torch.arange(5), torch.arange(3)
    assert rt.cached_pattern((a, b), "x", build) == 1
    assert rt.cached_pattern((a, b), "x", build) == 1      # hit
    assert rt.cached_pattern((a, b), "y", build) == 2      # other extra
    assert rt.cached_pattern((a, b), "x", build) == 1      # both kept: one pattern, two structures
    a.add_(1)                                              # in place: version moves
    assert rt.cached_pattern((a, b), "y", build) == 3
    assert rt.cached_pattern((a.clone(), b), "y", build) == 4  # another tensor
    with torch.inference_mode():
        c = torch.arange(4)
    assert rt.cached_pattern((c,), "y", build) == 5        # no version counter: never cached
    assert rt.cached_pattern((c,), "y", build) == 6


def test_a_freed_tensor_drops_its_entry():
    t = torch.arange(7)
    key = (id(t), "z")
    rt.cached_pattern((t,), "z", lambda: 0)
    assert key in rt._PATTERNS
    del t
    gc.collect()
    assert key not in rt._PATTERNS


def test_layers_follow_in_place_pattern_changes_on_the_cpu_path():
    """Forward, input and weight gradients of the unstructured and element-diagonal layers
    after the coordinate buffers change in place (a hand-made mask update)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, requires_grad=True)
    sparse = kernels.SparseLinear(40, 24, density=0.2, generator=g)
    diag = kernels.DiagLinear(40, 24, density=0.3, block_size=1, generator=g)
    for _ in range(2):
        for layer, ref in ((sparse, lambda x: sparse_matmul_ref(x, sparse.values, sparse.rows, sparse.cols, 24)),
                           (diag, lambda x: diag_matmul_ref(x, diag.values, diag.offsets, 1, 24))):
            y = layer(x) - layer.bias
            gx, gv = torch.autograd.grad(y.square().sum(), (x, layer.values))
            y_ref = ref(x)
            gx_ref, gv_ref = torch.autograd.grad(y_ref.square().sum(), (x, layer.values))
            torch.testing.assert_close(y, y_ref)
            torch.testing.assert_close(gx, gx_ref)
            torch.testing.assert_close(gv, gv_ref)  # the weight gradient (SDDMM) too
        with torch.no_grad():  # move every stored weight of both layers somewhere else, in place
            flat = torch.randperm(40 * 24, generator=g)[:sparse.nnz()].sort().values
            sparse.rows.copy_((flat // 40).to(torch.int32))
            sparse.cols.copy_((flat % 40).to(torch.int32))
            diag.offsets.copy_(torch.randperm(40, generator=g)[:diag.offsets.numel()].to(torch.int32))


def test_a_second_training_step_of_an_unchanged_pattern_derives_nothing_again(monkeypatch):
    """Row pointers, W^T orders, flat coordinates and the index checks' bounds come from the
    pattern cache from the second step on: nothing is sorted, reduced or rebuilt per call."""
    builds = []
    real = rt.cached_pattern
    monkeypatch.setattr(rt, "cached_pattern",
                        lambda tensors, extra, build: real(tensors, extra, lambda: builds.append(extra) or build()))
    g = torch.Generator().manual_seed(3)
    layers = {"fan-in": kernels.FanInLinear(64, 48, density=0.25, generator=g),
              "diag b=16": kernels.DiagLinear(64, 48, density=0.5, block_size=16, generator=g),
              "diag b=4": kernels.DiagLinear(64, 48, density=0.5, block_size=4, generator=g),
              "diag b=1": kernels.DiagLinear(64, 48, density=0.3, block_size=1, generator=g),
              "unstructured": kernels.SparseLinear(64, 48, density=0.2, generator=g)}
    for name, layer in layers.items():
        x = torch.randn(2, 20, 64, generator=g, requires_grad=True)  # (40 tokens: b = 1's sorted dW)
        for step in range(2):
            builds.clear()
            layer.zero_grad(set_to_none=True)
            layer(x).square().sum().backward()
        assert builds == [], f"{name}: the second step rebuilt {builds}"
