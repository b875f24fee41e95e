"""Constant fan-in (condensed, ELL) sparse matmul: SRigL's layer format.

    y[t, rows[r]] = sum_j values[r, j] * x[t, indices[r, j]]       r in [0, n_rows), j in [0, k)

x: [..., in], values: [n_rows, k], indices: int32 [n_rows, k] (k distinct columns per row),
rows: int32 [n_rows] the output neuron of each stored row (distinct). Output neurons that
are not in ``rows`` are ablated: they output 0 (their bias only, in the layer) and cost
nothing. ``rows=None`` means every neuron is active (n_rows == out_features).

Kernels: forward gathers x along the stored columns (CUDA cores, one FMA per nonzero);
the input gradient scatters with fp32 atomics; the weight gradient is the SDDMM of sddmm.py.

Example:
    y = fanin_matmul(x, values, indices)                      # every neuron active
    y = fanin_matmul(x, values, indices, rows, out_features=768)  # with ablated neurons
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import runtime as rt
from .coords import csr_structure, index_dtype, random_rows_of_distinct
from .module import SparseLayer
from .sddmm import _token_contiguous, acc_dtype, sddmm
from .sparse import csr_matmul


def fanin_matmul_ref(x, values, indices, rows=None, out_features=None):
    """The spec, through a dense weight (tests only)."""
    w = fanin_to_dense(values, indices, x.shape[-1], rows, out_features)
    return x @ w.t()


def fanin_to_dense(values, indices, in_features, rows=None, out_features=None):
    n_rows, k = values.shape
    out_features = n_rows if out_features is None else out_features
    rows = torch.arange(n_rows, device=values.device) if rows is None else rows.long()
    w = values.new_zeros(out_features, in_features)
    w[rows[:, None].expand(n_rows, k), indices.long()] = values
    return w


@triton.jit
def _fanin_fwd_kernel(
    x_ptr, values_ptr, indices_ptr, rows_ptr, y_ptr,
    T, n_rows, K,
    stride_xt, stride_xi, stride_vr, stride_ir, stride_yt, stride_yo,
    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    # Row tiles vary fastest: programs running together share one token tile of x (in L2).
    pid = tl.program_id(0).to(tl.int64)
    n_row_tiles = tl.cdiv(n_rows, BLOCK_R)
    pid_r = pid % n_row_tiles
    pid_t = pid // n_row_tiles
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < n_rows
    mask = mask_t[:, None] & mask_r[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for j in range(0, K):
        col = tl.load(indices_ptr + offs_r * stride_ir + j, mask=mask_r, other=0).to(tl.int64)  # [BR]
        v = tl.load(values_ptr + offs_r * stride_vr + j, mask=mask_r, other=0.0).to(ACC)  # [BR]
        xg = tl.load(x_ptr + offs_t[:, None] * stride_xt + col[None, :] * stride_xi, mask=mask, other=0.0)
        acc += xg.to(ACC) * v[None, :]  # [BT, BR]
    if HAS_ROWS:
        out_col = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        out_col = offs_r
    tl.store(y_ptr + offs_t[:, None] * stride_yt + out_col[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fanin_dx_kernel(
    dy_ptr, values_ptr, indices_ptr, rows_ptr, dx_ptr,
    T, n_rows, K,
    stride_dyt, stride_dyo, stride_vr, stride_ir, stride_dxt, stride_dxi,
    HAS_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, ACC: tl.constexpr,
):
    # dx[t, indices[r, j]] += dy[t, rows[r]] * values[r, j], scattered with atomics into an
    # fp32 (fp64 for fp64) buffer: a column receives from every row that holds it.
    # Row tiles vary fastest: programs running together share one token tile of x (in L2).
    pid = tl.program_id(0).to(tl.int64)
    n_row_tiles = tl.cdiv(n_rows, BLOCK_R)
    pid_r = pid % n_row_tiles
    pid_t = pid // n_row_tiles
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < n_rows
    mask = (offs_t < T)[:, None] & mask_r[None, :]
    if HAS_ROWS:
        out_col = tl.load(rows_ptr + offs_r, mask=mask_r, other=0).to(tl.int64)
    else:
        out_col = offs_r
    g = tl.load(dy_ptr + offs_t[:, None] * stride_dyt + out_col[None, :] * stride_dyo,
                mask=mask, other=0.0).to(ACC)  # [BT, BR]
    for j in range(0, K):
        col = tl.load(indices_ptr + offs_r * stride_ir + j, mask=mask_r, other=0).to(tl.int64)
        v = tl.load(values_ptr + offs_r * stride_vr + j, mask=mask_r, other=0.0).to(ACC)
        tl.atomic_add(dx_ptr + offs_t[:, None] * stride_dxt + col[None, :] * stride_dxi,
                      g * v[None, :], mask=mask, sem="relaxed")


def _check(x2, values, indices, rows, out_features):
    rt.check_float("x", x2)
    rt.check_float("values", values)
    rt.check_dtype_match("values", values, "x", x2)
    rt.check_index("indices", indices, 2)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [n_rows, k], got shape {tuple(values.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    n_rows = values.shape[0]
    if rows is not None:
        rt.check_index("rows", rows, 1)
        if rows.numel() != n_rows:
            raise ValueError(f"rows must hold one output index per stored row ({n_rows}), got {rows.numel()}")
    if out_features < n_rows:
        raise ValueError(f"out_features={out_features} is smaller than the {n_rows} stored rows")
    rt.check_same_device(x=x2, values=values, indices=indices, rows=rows)
    rt.check_range("indices", indices, x2.shape[-1])
    if rows is not None:
        rt.check_range("rows", rows, out_features)
    if rt.checks_enabled() and indices.numel() and indices.shape[1] > 1:
        if bool((indices.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("indices must hold k distinct columns in every row; found a repeated column")
    if rt.checks_enabled() and rows is not None and rows.numel() > 1:
        if bool((rows.sort().values.diff() == 0).any()):
            raise ValueError("rows must be distinct output neurons; found a repeat")


def _configs(kernel: str, T: int, dtype) -> dict:
    """Launch config. ``X_T``: 1 gives the kernel token-contiguous activations (x^T [in, T]
    for the forward's gather, an fp32 dx^T [in, T] for the input gradient's atomics), so that
    the 307 gathers (scatters) per output row of Linear(3072 -> 768) at 90% read (write)
    consecutive tokens of one input column: coalesced, where a row-major x makes every lane of
    a warp touch another 32-byte sector. The transposed copy costs one pass over the
    activation. Default 1 on a GPU (the access pattern argument; bench/sweep.py times both), 0
    under the interpreter (its programs run one by one: no coalescing to gain)."""
    default = ({"BLOCK_T": 64, "BLOCK_R": 64, "num_warps": 4, "X_T": 0} if rt.interpreting()
               else {"BLOCK_T": 32, "BLOCK_R": 64, "num_warps": 4, "X_T": 1})
    return rt.launch_config(kernel, {"T": rt.shape_bucket(T), "dtype": str(dtype)[6:]}, default)


def fanin_fwd(x2, values, indices, rows, out_features: int) -> torch.Tensor:
    """Launcher of the forward kernel. x2: [T, in] -> y: [T, out_features]."""
    _check(x2, values, indices, rows, out_features)
    T, (n_rows, K) = x2.shape[0], values.shape
    has_rows = rows is not None
    alloc = torch.zeros if n_rows < out_features else torch.empty
    y = alloc(T, out_features, dtype=x2.dtype, device=x2.device)
    if T == 0 or n_rows == 0:
        return y.zero_()
    if K == 0:
        return y.zero_()
    values, indices = values.contiguous(), indices.contiguous()
    cfg = _configs("fanin_fwd", T, x2.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    # x[t, i] at x + t * stride_t + i * stride_i, from x itself or from a token-contiguous copy
    xs, (stride_t, stride_i) = (x2, x2.stride()) if not cfg.get("X_T") else _token_contiguous(x2)
    _fanin_fwd_kernel[grid](
        xs, values, indices, rows if has_rows else indices, y, T, n_rows, K,
        stride_t, stride_i, values.stride(0), indices.stride(0), y.stride(0), y.stride(1),
        HAS_ROWS=has_rows, BLOCK_T=cfg["BLOCK_T"], BLOCK_R=cfg["BLOCK_R"], ACC=acc_dtype(x2.dtype),
        num_warps=cfg["num_warps"])
    return y


def fanin_dx(dy, values, indices, rows, in_features: int) -> torch.Tensor:
    """Launcher of the input-gradient kernel. dy: [T, out] -> dx: [T, in_features]."""
    T, (n_rows, K) = dy.shape[0], values.shape
    buf_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    if T == 0 or n_rows == 0 or K == 0:
        return torch.zeros(T, in_features, dtype=dy.dtype, device=dy.device)
    values, indices = values.contiguous(), indices.contiguous()
    has_rows = rows is not None
    cfg = _configs("fanin_dx", T, dy.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(n_rows, cfg["BLOCK_R"]),)
    # The atomics' buffer: dx itself [T, in] or dx^T [in, T] (consecutive tokens adjacent)
    dx = (torch.zeros(in_features, T, dtype=buf_dtype, device=dy.device).t() if cfg.get("X_T")
          else torch.zeros(T, in_features, dtype=buf_dtype, device=dy.device))
    _fanin_dx_kernel[grid](
        dy, values, indices, rows if has_rows else indices, dx, T, n_rows, K,
        dy.stride(0), dy.stride(1), values.stride(0), indices.stride(0), dx.stride(0), dx.stride(1),
        HAS_ROWS=has_rows, BLOCK_T=cfg["BLOCK_T"], BLOCK_R=cfg["BLOCK_R"], ACC=acc_dtype(dy.dtype),
        num_warps=cfg["num_warps"])
    return dx.to(dy.dtype).contiguous()


def fanin_fwd_torch(x2, values, indices, rows, out_features: int) -> torch.Tensor:
    """CPU path: a CSR product (the fan-in rows are CSR rows of length k, so the row pointers
    are an arange and nothing is sorted; the int32 indices are used as they are). One token is
    MKL's sparse matrix-vector product, the batch-1 inference case."""
    _check(x2, values, indices, rows, out_features)
    T, (n_rows, K) = x2.shape[0], values.shape
    if T == 0 or n_rows == 0 or K == 0:
        return x2.new_zeros(T, out_features)
    crow = torch.arange(0, n_rows * K + 1, K, device=x2.device, dtype=index_dtype(n_rows * K))
    part = csr_matmul(crow, indices.reshape(-1), values.reshape(-1), n_rows, x2.shape[1], x2.t()).t()
    if rows is None and n_rows == out_features:
        return part.to(x2.dtype).contiguous()
    y = x2.new_zeros(T, out_features, dtype=part.dtype)
    if rows is None:
        y[:, :n_rows] = part
    else:
        y[:, rows.long()] = part
    return y.to(x2.dtype)


def _transposed_pattern(indices, rows, in_features: int, out_features: int):
    """(order, crow, src_rows): W^T in CSR for the fan-in pattern (coords.csr_structure of the
    swapped coordinates) - the stored values taken in ``order`` are W^T's values, ``src_rows``
    their columns (the output neurons). Cached per pattern (rt.cached_pattern): its argsort
    costs ~3.5 ms at 236k nonzeros, two thirds of the CPU input gradient of
    Linear(768 -> 3072) at 197 tokens."""
    def build():
        n_rows, K = indices.shape
        out_of_row = torch.arange(n_rows, dtype=torch.int32, device=indices.device) if rows is None else rows
        return csr_structure(indices.reshape(-1), out_of_row.repeat_interleave(K), in_features, out_features)

    tensors = (indices,) if rows is None else (indices, rows)
    return rt.cached_pattern(tensors, ("fanin^T", in_features, out_features), build)


def fanin_dx_torch(dy, values, indices, rows, in_features: int) -> torch.Tensor:
    """CPU path: dX = dY W as a CSR product with W^T, whose rows are the input columns (its
    structure cached per pattern, see _transposed_pattern)."""
    T, (n_rows, K) = dy.shape[0], values.shape
    if T == 0 or n_rows == 0 or K == 0:
        return dy.new_zeros(T, in_features)
    order, crow, src_rows = _transposed_pattern(indices, rows, in_features, dy.shape[1])
    vals = values.reshape(-1) if order is None else values.reshape(-1)[order]
    return csr_matmul(crow, src_rows, vals, in_features, dy.shape[1], dy.t()).t().contiguous()


def _fanin_dw(dy, x2, indices, rows):
    n_rows, K = indices.shape
    out_of_row = (torch.arange(n_rows, device=indices.device, dtype=torch.int32) if rows is None
                  else rows)
    flat_rows = out_of_row.repeat_interleave(K)
    return sddmm(dy, x2, flat_rows, indices.reshape(-1)).reshape(n_rows, K)


@torch.library.custom_op("alwayssparse::fanin_matmul", mutates_args=())
def _fanin_op(x2: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
              rows: torch.Tensor | None, out_features: int) -> torch.Tensor:
    if rt.runs_triton(x2):
        return fanin_fwd(x2, values, indices, rows, out_features)
    return fanin_fwd_torch(x2, values, indices, rows, out_features)


@_fanin_op.register_fake
def _(x2, values, indices, rows, out_features):
    return x2.new_empty(x2.shape[0], out_features)


@torch.library.custom_op("alwayssparse::fanin_dx", mutates_args=())
def _fanin_dx_op(dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor | None, in_features: int) -> torch.Tensor:
    if rt.runs_triton(dy):
        return fanin_dx(dy, values, indices, rows, in_features)
    return fanin_dx_torch(dy, values, indices, rows, in_features)


@_fanin_dx_op.register_fake
def _(dy, values, indices, rows, in_features):
    return dy.new_empty(dy.shape[0], in_features)


def _setup(ctx, inputs, output):
    x2, values, indices, rows, _ = inputs
    ctx.save_for_backward(x2, values, indices, rows)


def _backward(ctx, dy):
    x2, values, indices, rows = ctx.saved_tensors
    dy = dy.contiguous()  # a gradient from .sum() has stride 0
    dx = _fanin_dx_op(dy, values, indices, rows, x2.shape[1]) if ctx.needs_input_grad[0] else None
    dv = _fanin_dw(dy, x2, indices, rows) if ctx.needs_input_grad[1] else None
    return dx, dv, None, None, None


_fanin_op.register_autograd(_backward, setup_context=_setup)
rt.register_autocast("alwayssparse::fanin_matmul")
rt.register_autocast("alwayssparse::fanin_dx")


def fanin_matmul(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor | None = None, out_features: int | None = None) -> torch.Tensor:
    """Constant fan-in sparse product y = x W^T with W stored condensed.

    Args:
        x: [..., in].
        values: [n_rows, k], same dtype as x.
        indices: int32 [n_rows, k], distinct columns per row, each in [0, in).
        rows: int32 [n_rows] distinct output neurons of the stored rows, or None for
            ``arange(n_rows)``. Neurons absent from ``rows`` are ablated and output 0.
        out_features: width of y; defaults to n_rows.
    Returns:
        y: [..., out_features]. Differentiable in x and values.

    Example:
        >>> idx = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32)
        >>> y = fanin_matmul(torch.randn(5, 4), torch.randn(2, 2), idx)  # [5, 2]
    """
    rt.check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in]")
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a 2-D tensor [n_rows, k], got {getattr(values, 'shape', values)!r}")
    out_features = values.shape[0] if out_features is None else int(out_features)
    rt.check_same_device(x=x, values=values, indices=indices, rows=rows)
    lead = x.shape[:-1]
    x2 = rt.flatten_tokens(x)
    y = _fanin_op(x2, values, indices, rows, out_features)
    return y.reshape(*lead, out_features)


class FanInLinear(SparseLayer):
    """Drop-in ``nn.Linear`` with constant fan-in k per active output neuron (SRigL).

    Parameters: ``values [n_rows, k]`` (and ``bias [out]``); buffers: ``indices [n_rows, k]``
    int32 and ``rows [n_rows]`` int32, the active neurons. Created sparse: no dense weight
    exists at any point. Values start uniform in +-1/sqrt(k), the real fan-in.

    Example:
        >>> layer = FanInLinear(768, 3072, density=0.1)
        >>> y = layer(torch.randn(4, 768))
    """

    def __init__(self, in_features: int, out_features: int, density: float | None = None, *,
                 k: int | None = None, bias: bool = True, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        if k is None:
            if density is None:
                raise ValueError("give density (in (0, 1]) or k (fan-in per neuron)")
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density must lie in (0, 1], got {density}")
            k = max(1, round(density * in_features))
        if not 1 <= k <= in_features:
            raise ValueError(f"k must lie in [1, in_features={in_features}], got {k}")
        indices = random_rows_of_distinct(out_features, in_features, k, generator=generator, device=device)
        bound = 1.0 / math.sqrt(k)
        values = torch.empty(out_features, k, device=device, dtype=dtype)
        values.uniform_(-bound, bound, generator=generator)
        self.values = torch.nn.Parameter(values)
        self.register_buffer("indices", indices)
        self.register_buffer("rows", torch.arange(out_features, dtype=torch.int32, device=device))
        self.reset_bias(bound, generator)

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def forward(self, x):
        y = self.cpu_inference(x)
        if y is not None:
            return y
        y = fanin_matmul(x, self.values, self.indices, self.rows, self.out_features)
        return self.add_bias(y)

    def nnz(self) -> int:
        return self.values.numel()

    def coords(self):
        n_rows, k = self.indices.shape
        return self.rows.repeat_interleave(k), self.indices.reshape(-1)

    def to_dense(self) -> torch.Tensor:
        return fanin_to_dense(self.values.detach(), self.indices, self.in_features, self.rows, self.out_features)

    def set_pattern(self, values: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace the sparsity pattern (a mask update): checks it, then swaps it in."""
        x_probe = self.values.new_empty(0, self.in_features)
        with torch.no_grad():
            _check(x_probe, values.to(self.values.dtype), indices, rows, self.out_features)
        self._swap_values(values.to(self.values.dtype).contiguous())
        self.indices = indices.to(torch.int32).contiguous()
        self.rows = rows.to(torch.int32).contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None):
        """Build from a dense weight and an explicit boolean mask with the same count in every
        non-empty row (empty rows become ablated neurons)."""
        if weight.dim() != 2 or mask.shape != weight.shape:
            raise ValueError(f"weight must be 2-D and mask of its shape, got {tuple(weight.shape)} and {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        counts = mask.sum(1)
        active = torch.nonzero(counts > 0).flatten()
        ks = counts[active].unique()
        if ks.numel() > 1:
            raise ValueError(f"mask must have one count per non-empty row (constant fan-in), found {ks.tolist()}")
        out_features, in_features = weight.shape
        k = int(ks[0]) if ks.numel() else 1
        layer = cls(in_features, out_features, k=k, bias=bias is not None, device=weight.device, dtype=weight.dtype)
        sub = mask[active]
        indices = torch.nonzero(sub)[:, 1].reshape(len(active), k).to(torch.int32)
        values = weight[active].gather(1, indices.long())
        layer.set_pattern(values.detach().clone(), indices, active.to(torch.int32))
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer
