"""Unstructured sparse matmul over a coordinate list: the RigL / SET / GSE / static layer, and
the CSR baseline of the benchmarks.

    y[t, r] = sum_{i : rows[i] = r} values[i] * x[t, cols[i]]

values: [nnz], rows / cols: int32 [nnz], coordinates distinct, kept sorted by (row, col) by
the layer. Forward and input gradient run torch.sparse CSR (MKL on CPU, cuSPARSE on CUDA;
fp16/bf16 on CPU are computed in fp32 since MKL has no such kernels); the weight gradient is
our SDDMM at the stored coordinates.

No Triton kernel of its own: the raw kernel of this format is ``kernels.sddmm_kernel`` (its
weight gradient, launched by ``kernels.sddmm_fwd``); ``csr_matmul`` is the product the forward
and the input gradient run (torch.sparse CSR).

Example:
    y = sparse_matmul(x, values, rows, cols, out_features=3072)
"""
from __future__ import annotations

import math
import warnings

import torch

from . import cpu as cpu_native
from . import runtime as rt
from .coords import csr_structure, sample_distinct, sort_coords, stored_count
from .module import SparseLayer, bias_add, check_bias
from .sddmm import sddmm

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")


def sparse_to_dense(values, rows, cols, in_features, out_features):
    """The dense [out_features, in_features] weight of a coordinate list (tests, export);
    repeated coordinates add up."""
    w = values.new_zeros(out_features, in_features)
    w.index_put_((rows.long(), cols.long()), values, accumulate=True)
    return w


def sparse_matmul_ref(x, values, rows, cols, out_features):
    """The spec, through a dense weight (tests only)."""
    return x @ sparse_to_dense(values, rows, cols, x.shape[-1], out_features).t()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return t.dtype


def csr_matmul(crow, col, values, n_rows, n_cols, dense_t):
    """W @ dense_t for W [n_rows, n_cols] in CSR: in fp32 on CPU through the native library
    (kernels.cpu: 2-byte indices, tiles of tokens; the forward and input grad of every format
    in a CPU training step) where it applies, else through torch.sparse (MKL on CPU, cuSPARSE
    on CUDA). No autograd, no checks: the caller passes a valid CSR structure.

    Args:
        crow: int32 or int64 [n_rows + 1], row pointers: crow[0] = 0, non-decreasing,
            crow[-1] = nnz.
        col: int32 or int64 [nnz], column of each value, each in [0, n_cols), sorted within
            a row (the int64 path is taken unless crow and col are both int32).
        values: [nnz], a float dtype (cast to dense_t's compute dtype).
        n_rows, n_cols: int, the shape of W.
        dense_t: [n_cols, T], fp16, bf16, fp32 or fp64; fp16 / bf16 on CPU are computed in fp32
            (MKL has no such kernels). One token (T = 1) is a sparse matrix-vector product:
            MKL's mv is ~2.5x faster than its mm with one column (Linear 3072 -> 768 at 90%,
            1 thread).
    Returns:
        [n_rows, T] in dense_t's dtype.
    """
    y = cpu_native.csr_matmul(crow, col, values, n_rows, n_cols, dense_t)
    if y is not None:
        return y
    dt = _compute_dtype(dense_t)
    idx = torch.int32 if crow.dtype == col.dtype == torch.int32 else torch.int64
    w = torch.sparse_csr_tensor(crow.to(idx), col.to(idx), values.to(dt), size=(n_rows, n_cols),
                                check_invariants=False)
    if dense_t.shape[1] == 1:
        return torch.mv(w, dense_t[:, 0].to(dt)).unsqueeze(1).to(dense_t.dtype)
    # A row-major right-hand side: MKL is ~1.5x faster on it than on the transposed view it
    # usually gets (x.t()), copy included (256 x 64 at 10%, 2176 tokens: 1.24 vs 1.88 ms).
    return (w @ dense_t.to(dt).contiguous()).to(dense_t.dtype)


def _spmm(values, rows, cols, n_rows, n_cols, dense_t):
    """(W @ dense_t) with W [n_rows, n_cols] given by coordinates in any order; the CSR
    structure is cached per coordinate tensors (rt.cached_pattern)."""
    order, crow, csr_cols = rt.cached_pattern((rows, cols), ("csr", n_rows, n_cols),
                                              lambda: csr_structure(rows, cols, n_rows, n_cols))
    if order is not None:
        values = values.index_select(0, order)  # (4x faster than values[order] on CPU)
    return csr_matmul(crow, csr_cols, values, n_rows, n_cols, dense_t)


def _check(x2, values, rows, cols, out_features):
    rt.check_float("x", x2)
    rt.check_float("values", values)
    rt.check_dtype_match("values", values, "x", x2)
    rt.check_index("rows", rows, 1)
    rt.check_index("cols", cols, 1)
    if values.dim() != 1 or rows.shape != values.shape or cols.shape != values.shape:
        raise ValueError(f"values, rows and cols must be 1-D of one length, got {tuple(values.shape)}, "
                         f"{tuple(rows.shape)}, {tuple(cols.shape)}")
    rt.check_same_device(x=x2, values=values, rows=rows, cols=cols)
    rt.check_range("rows", rows, out_features)
    rt.check_range("cols", cols, x2.shape[-1])


@rt.backend_op("alwayssparse::sparse_matmul", None, 4)
def _sparse_op(x2: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
               out_features: int) -> torch.Tensor:
    _check(x2, values, rows, cols, out_features)
    if values.numel() == 0 or x2.shape[0] == 0:
        return x2.new_zeros(x2.shape[0], out_features)
    return _spmm(values, rows, cols, out_features, x2.shape[1], x2.t()).t().contiguous()


@rt.backend_op("alwayssparse::sparse_dx", None, 4)
def _sparse_dx_op(dy: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  in_features: int) -> torch.Tensor:
    if values.numel() == 0 or dy.shape[0] == 0:
        return dy.new_zeros(dy.shape[0], in_features)
    # dX = dY W = (W^T dY^T)^T, W^T has the coordinates swapped.
    return _spmm(values, cols, rows, in_features, dy.shape[1], dy.t()).t().contiguous()


rt.register_linear_autograd(_sparse_op, _sparse_dx_op, sddmm)


def sparse_matmul(x: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Unstructured sparse product y = x W^T (+ bias), W given by (rows, cols, values).

    Args:
        x: [..., in]; values: [nnz] (dtype of x); rows, cols: int32 [nnz], distinct coordinates,
        rows in [0, out_features), cols in [0, in).
        bias: [out_features] or None, added in y's dtype (module.bias_add: in place on CPU).
    Returns:
        y: [..., out_features]. Differentiable in x, values and bias.

    Example:
        >>> r, c = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
        >>> y = sparse_matmul(torch.randn(5, 3), torch.randn(2), r, c, out_features=2)
    """
    rt.check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in]")
    check_bias(bias, out_features)
    rt.check_same_device(x=x, values=values, rows=rows, cols=cols, bias=bias)
    lead = x.shape[:-1]
    y = bias_add(_sparse_op(rt.flatten_tokens(x), values, rows, cols, int(out_features)), bias)
    return y.reshape(*lead, out_features)


class SparseLinear(SparseLayer):
    """Drop-in ``nn.Linear`` with an unstructured pattern of nnz weights (RigL, SET, GSE, static).

    Parameters: ``values [nnz]`` (and ``bias``); buffers ``rows``, ``cols`` int32 [nnz], sorted
    by (row, col). Created sparse: coordinates are drawn without ever forming [out, in].
    Values start uniform in +-1/sqrt(nnz / out), the mean real fan-in.

    Example:
        >>> layer = SparseLinear(768, 3072, density=0.1)
        >>> y = layer(torch.randn(4, 768))
    """
    format = "sparse"
    pattern_buffers = ("rows", "cols")

    def __init__(self, in_features: int, out_features: int, density: float | None = None, *,
                 nnz: int | None = None, bias: bool = True, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        total = in_features * out_features
        nnz = stored_count("nnz", nnz, density, total)
        flat = sample_distinct(total, nnz, generator=generator, device=device)
        self.register_buffer("rows", (flat // in_features).to(torch.int32))
        self.register_buffer("cols", (flat % in_features).to(torch.int32))
        bound = 1.0 / math.sqrt(max(nnz / out_features, 1.0))
        values = torch.empty(nnz, device=device, dtype=dtype)
        values.uniform_(-bound, bound, generator=generator)
        self.values = torch.nn.Parameter(values)
        self.reset_bias(bound, generator)

    def forward(self, x):
        y = self.cpu_inference(x)
        if y is not None:
            return y
        return sparse_matmul(x, self.values, self.rows, self.cols, self.out_features, self.bias)

    def coords(self):
        return self.rows, self.cols

    def flat_coords(self) -> torch.Tensor:
        """Sorted int64 row * in + col of the stored weights."""
        return self.rows.long() * self.in_features + self.cols.long()

    def to_dense(self) -> torch.Tensor:
        return sparse_to_dense(self.values.detach(), self.rows, self.cols, self.in_features, self.out_features)

    def set_pattern(self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Replace the pattern (a mask update): checks it, sorts it by (row, col), swaps it in."""
        probe = self.values.new_empty(0, self.in_features)
        rows, cols = rows.to(torch.int32), cols.to(torch.int32)
        _check(probe, values.to(self.values.dtype).reshape(-1), rows, cols, self.out_features)
        order = sort_coords(rows, cols, self.in_features)
        flat = rows[order].long() * self.in_features + cols[order].long()
        if rt.checks_enabled() and flat.numel() > 1 and bool((flat.diff() == 0).any()):
            raise ValueError("rows/cols must be distinct coordinates; found a repeat")
        self._swap_values(values.to(self.values.dtype)[order].contiguous())
        self.rows = rows[order].contiguous()
        self.cols = cols[order].contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None):
        """Build from a dense weight and an explicit boolean mask (zeros inside it are kept)."""
        if weight.dim() != 2 or mask.shape != weight.shape:
            raise ValueError(f"weight must be 2-D and mask of its shape, got {tuple(weight.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        out_features, in_features = weight.shape
        nz = torch.nonzero(mask)
        layer = cls(in_features, out_features, nnz=max(1, nz.shape[0]), bias=bias is not None,
                    device=weight.device, dtype=weight.dtype)
        layer.set_pattern(weight.detach()[nz[:, 0], nz[:, 1]].clone(), nz[:, 0], nz[:, 1])
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer
