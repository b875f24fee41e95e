"""Bad input gets a clear error naming the argument and the expectation."""
import pytest
import torch

import kernels

I32 = torch.int32


def fanin_args():
    return torch.randn(3, 8), torch.randn(4, 2), torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=I32)


def diag_args():
    return torch.randn(3, 16), torch.randn(2, 4, 4, 4), torch.tensor([0, 2], dtype=I32)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    with kernels.use_backend(request.param):
        yield


CASES = {
    "fanin index dtype": (lambda: kernels.fanin_matmul(*fanin_args()[:2], fanin_args()[2].long()), TypeError, "indices must have dtype torch.int32"),
    "fanin index range": (lambda: kernels.fanin_matmul(*fanin_args()[:2], torch.tensor([[0, 8]] * 4, dtype=I32)), ValueError, r"indices must lie in \[0, 8\)"),
    "fanin negative index": (lambda: kernels.fanin_matmul(*fanin_args()[:2], torch.tensor([[0, -1]] * 4, dtype=I32)), ValueError, "indices must lie in"),
    "fanin repeated column": (lambda: kernels.fanin_matmul(*fanin_args()[:2], torch.tensor([[1, 1]] * 4, dtype=I32)), ValueError, "distinct columns"),
    "fanin shape mismatch": (lambda: kernels.fanin_matmul(fanin_args()[0], torch.randn(4, 3), fanin_args()[2]), ValueError, "indices must have the shape of values"),
    "fanin dtype mismatch": (lambda: kernels.fanin_matmul(fanin_args()[0], torch.randn(4, 2).double(), fanin_args()[2]), TypeError, "values must have the dtype of x"),
    "fanin int input": (lambda: kernels.fanin_matmul(torch.ones(3, 8, dtype=torch.int64), *fanin_args()[1:]), TypeError, "x must be float32"),
    "fanin rows range": (lambda: kernels.fanin_matmul(*fanin_args(), torch.tensor([0, 1, 2, 9], dtype=I32), 5), ValueError, r"rows must lie in \[0, 5\)"),
    "fanin repeated rows": (lambda: kernels.fanin_matmul(*fanin_args(), torch.tensor([0, 1, 1, 2], dtype=I32), 5), ValueError, "rows must be distinct"),
    "fanin device mismatch": (lambda: kernels.fanin_matmul(fanin_args()[0], fanin_args()[1].to("meta"), fanin_args()[2]), ValueError, "one device"),
    "fanin bias shape": (lambda: kernels.fanin_matmul(*fanin_args(), None, 4, torch.randn(3)), ValueError, r"bias must be \[out_features\] = \[4\], got \(3,\)"),
    "fanin bias dtype": (lambda: kernels.fanin_matmul(*fanin_args(), None, 4, torch.ones(4, dtype=torch.int64)), TypeError, "bias must be float32"),
    "sparse bias shape": (lambda: kernels.sparse_matmul(torch.randn(2, 4), torch.randn(2), torch.tensor([0, 1], dtype=I32), torch.tensor([0, 1], dtype=I32), 3, torch.randn(3, 1)), ValueError, r"bias must be \[out_features\] = \[3\]"),
    "diag device mismatch": (lambda: kernels.diag_matmul(diag_args()[0], diag_args()[1], diag_args()[2].to("meta"), 4), ValueError, "one device"),
    "sddmm device mismatch": (lambda: kernels.sddmm(torch.randn(3, 4), torch.randn(3, 4, device="meta"), torch.zeros(1, dtype=I32), torch.zeros(1, dtype=I32)), ValueError, "one device"),
    "diag block size": (lambda: kernels.diag_matmul(torch.randn(3, 18), torch.randn(2, 4, 4, 4), diag_args()[2], 4), ValueError, "block_size=4 must divide"),
    "diag offset range": (lambda: kernels.diag_matmul(*diag_args()[:2], torch.tensor([0, 4], dtype=I32), 4), ValueError, r"offsets must lie in \[0, 4\)"),
    "diag repeated offset": (lambda: kernels.diag_matmul(*diag_args()[:2], torch.tensor([1, 1], dtype=I32), 4), ValueError, "distinct diagonals"),
    "diag values shape": (lambda: kernels.diag_matmul(diag_args()[0], torch.randn(2, 3, 4, 4), diag_args()[2], 4, 16), ValueError, r"values must have shape \[K, D, b, b\]"),
    "diag offsets dtype": (lambda: kernels.diag_matmul(*diag_args()[:2], diag_args()[2].long(), 4), TypeError, "offsets must have dtype torch.int32"),
    "diag zero block size": (lambda: kernels.diag_matmul(*diag_args(), 0), ValueError, "block_size must be a positive int"),
    "sparse coordinate range": (lambda: kernels.sparse_matmul(torch.randn(2, 4), torch.randn(2), torch.tensor([0, 3], dtype=I32), torch.tensor([0, 1], dtype=I32), 3), ValueError, r"rows must lie in \[0, 3\)"),
    "sparse length mismatch": (lambda: kernels.sparse_matmul(torch.randn(2, 4), torch.randn(3), torch.tensor([0, 1], dtype=I32), torch.tensor([0, 1], dtype=I32), 3), ValueError, "one length"),
    "sddmm token mismatch": (lambda: kernels.sddmm(torch.randn(3, 4), torch.randn(2, 4), torch.zeros(1, dtype=I32), torch.zeros(1, dtype=I32)), ValueError, "token dimension"),
    "sddmm col range": (lambda: kernels.sddmm(torch.randn(3, 4), torch.randn(3, 5), torch.zeros(1, dtype=I32), torch.tensor([5], dtype=I32)), ValueError, r"cols must lie in \[0, 5\)"),
    "sddmm block size": (lambda: kernels.sddmm(torch.randn(3, 4), torch.randn(3, 6), torch.zeros(1, dtype=I32), torch.zeros(1, dtype=I32), 4), ValueError, "must divide"),
    "layer density": (lambda: kernels.SparseLinear(4, 4, density=1.5), ValueError, r"density must lie in \(0, 1\]"),
    "layer fan-in k": (lambda: kernels.FanInLinear(4, 4, k=5), ValueError, r"k must lie in \[1, in_features=4\]"),
    "layer diag block": (lambda: kernels.DiagLinear(10, 8, 0.5, block_size=4), ValueError, "block_size=4 must divide"),
    "layer features": (lambda: kernels.SparseLinear(0, 4, 0.5), ValueError, "in_features must be a positive int"),
    "backend name": (lambda: kernels.set_backend("cuda"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_a_clear_error(backend, case):
    fn, exc, message = CASES[case]
    with pytest.raises(exc, match=message):
        fn()


def test_set_pattern_rejects_a_bad_pattern_and_keeps_the_old_one():
    torch.manual_seed(0)
    layer = kernels.FanInLinear(8, 4, k=2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="indices must lie in"):
        layer.set_pattern(torch.randn(4, 2), torch.full((4, 2), 9, dtype=I32), torch.arange(4, dtype=I32))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
