"""Custom-op plumbing: opcheck, fp64 gradcheck through the Triton kernels, torch.compile."""
import pytest
import torch

import kernels
from kernels import diag, fanin, sparse
from kernels.sddmm import _sddmm_op

from .conftest import DEVICE


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 32, generator=g, dtype=dtype).to(DEVICE)
    fan_idx = torch.stack([torch.randperm(32, generator=g)[:5] for _ in range(7)]).to(torch.int32).to(DEVICE)
    fan_v = torch.randn(7, 5, generator=g, dtype=dtype).to(DEVICE)
    fan_rows = torch.tensor([0, 2, 3, 5, 6, 8, 11], dtype=torch.int32, device=DEVICE)
    off = torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)
    dv = torch.randn(2, 4, 4, 4, generator=g, dtype=dtype).to(DEVICE)  # in 32 = 8 blocks, out 16 = 4 blocks
    return x, fan_v, fan_idx, fan_rows, dv, off


OPCHECK_CASES = {
    "fanin": lambda x, fv, fi, fr, dv, off: (fanin._fanin_op, (x, fv.requires_grad_(), fi, fr, 12)),
    "fanin_full_rows": lambda x, fv, fi, fr, dv, off: (fanin._fanin_op, (x, fv.requires_grad_(), fi, None, 7)),
    "fanin_dx": lambda x, fv, fi, fr, dv, off: (fanin._fanin_dx_op, (torch.randn(6, 12, dtype=x.dtype, device=x.device), fv, fi, fr, 32)),
    "diag": lambda x, fv, fi, fr, dv, off: (diag._diag_op, (x, dv.requires_grad_(), off, 4, 16)),
    "diag_dx": lambda x, fv, fi, fr, dv, off: (diag._diag_dx_op, (torch.randn(6, 16, dtype=x.dtype, device=x.device), dv, off, 4, 32)),
    "sddmm": lambda x, fv, fi, fr, dv, off: (_sddmm_op, (torch.randn(6, 12, dtype=x.dtype, device=x.device), x, fr, fi[:, 0].contiguous(), 1)),
    "sparse": lambda x, fv, fi, fr, dv, off: (sparse._sparse_op, (x, fv[:, 0].contiguous().requires_grad_(), fr, fi[:, 0].contiguous(), 12)),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck_passes(backend, case):
    op, args = OPCHECK_CASES[case](*_inputs())
    torch.library.opcheck(op.op, args)  # (the CustomOpDef behind the eager CPU calls)


@pytest.mark.parametrize("op", ["fanin", "diag", "sparse"])
def test_gradcheck_in_fp64(backend, op):
    x, fv, fi, fr, dv, off = _inputs(1)
    # Few elements: gradcheck launches the kernels twice per input element.
    x, dv = x[:3], dv[:, :2, :2, :2].contiguous()
    fns = {
        "fanin": (lambda a, v: kernels.fanin_matmul(a, v, fi, fr, 12), fv),
        "diag": (lambda a, v: kernels.diag_matmul(a[:, :8], v, off, 2, 4), dv),
        "sparse": (lambda a, v: kernels.sparse_matmul(a, v, fr, fi[:, 0].contiguous(), 12), fv[:, 0].contiguous()),
    }
    fn, v = fns[op]
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), v.requires_grad_()))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = kernels.FanInLinear(32, 64, 0.25)
        self.b = kernels.DiagLinear(64, 64, 0.25, block_size=16)
        self.c = kernels.SparseLinear(64, 10, 0.2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_traces_a_model_of_sparse_layers(backend, compiler):
    torch.manual_seed(0)
    model = _Tiny().to(DEVICE)
    x = torch.randn(4, 32, device=DEVICE)
    ref = model(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
