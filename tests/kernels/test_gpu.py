"""Native GPU runs at the shapes that matter (ViT-B / BERT-base linears) in bf16 and fp16.
On CPU the interpreter already runs every kernel in the other tests; these need real CUDA."""
import pytest
import torch

import kernels
from kernels.sddmm import sddmm_ref

from .conftest import assert_matches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); "
                                "the CPU runs the same kernels through the Triton interpreter elsewhere")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_in,n_out", [(768, 3072), (3072, 768), (768, 2304)])
def test_fanin_at_vit_shapes(dtype, n_in, n_out):
    torch.manual_seed(0)
    layer = kernels.FanInLinear(n_in, n_out, density=0.1, device="cuda", dtype=dtype)
    x = torch.randn(4096, n_in, device="cuda", dtype=dtype, requires_grad=True)
    y = layer(x)
    w64 = layer.to_dense().double()
    assert_matches(y - layer.bias, x.double() @ w64.t(), x @ layer.to_dense().t())
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_matches(x.grad, dy.double() @ w64, dy @ layer.to_dense())
    rows, cols = layer.coords()
    gv = sddmm_ref(dy.double(), x.detach().double(), rows, cols).reshape(layer.values.shape)
    assert_matches(layer.values.grad, gv, sddmm_ref(dy, x.detach(), rows, cols).reshape(layer.values.shape))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b", [1, 16, 32, 64])
@pytest.mark.parametrize("n_in,n_out", [(768, 3072), (3072, 768)])
def test_diag_at_vit_shapes(dtype, b, n_in, n_out):
    torch.manual_seed(0)
    layer = kernels.DiagLinear(n_in, n_out, density=0.1, block_size=b, device="cuda", dtype=dtype)
    x = torch.randn(2048, n_in, device="cuda", dtype=dtype, requires_grad=True)
    y = kernels.diag_matmul(x, layer.values, layer.offsets, b, n_out)
    w = layer.to_dense()
    assert_matches(y, x.double() @ w.double().t(), x @ w.t())
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_matches(x.grad, dy.double() @ w.double(), dy @ w)


def test_compiled_model_runs_on_gpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(kernels.FanInLinear(256, 512, 0.1), torch.nn.GELU(),
                                kernels.DiagLinear(512, 256, 0.1, block_size=16)).cuda().to(torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref = model(x)
    out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, ref)
