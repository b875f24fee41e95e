"""Constant fan-in (condensed, ELL) sparse matmul: SRigL's layer format.

    y[t, rows[r]] = sum_j values[r, j] * x[t, indices[r, j]]       r in [0, n_rows), j in [0, k)

x: [..., in], values: [n_rows, k], indices: int32 [n_rows, k] (k distinct columns per row),
rows: int32 [n_rows] the output neuron of each stored row (distinct). Output neurons that
are not in ``rows`` are ablated: they output 0 (their bias only, in the layer) and cost
nothing. ``rows=None`` means every neuron is active (n_rows == out_features).

Raw kernels (for other Triton projects; each docstring gives its grid and every argument):
``fanin_fwd_kernel`` (launcher ``fanin_fwd``), ``fanin_dx_kernel`` (launcher ``fanin_dx``,
index ``fanout_structure``). The forward gathers x along the stored columns (CUDA cores, one FMA per nonzero);
the input gradient gathers dy the same way along W^T, a fan-out index built once per pattern
(fanout_structure: no atomics, bitwise-reproducible); the weight gradient is the SDDMM of
sddmm.py. Below ~2 programs per SM (few tokens) both split their reduction over extra
programs and add the partial sums in a fixed order.

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
from .coords import csr_structure, index_dtype, random_rows_of_distinct, stored_count
from .module import SparseLayer, bias_add, check_bias
from .sddmm import _token_contiguous, acc_dtype, sddmm
from .sparse import csr_matmul


def fanin_matmul_ref(x, values, indices, rows=None, out_features=None):
    """The spec, through a dense weight (tests only)."""
    w = fanin_to_dense(values, indices, x.shape[-1], rows, out_features)
    return x @ w.t()


def fanin_to_dense(values, indices, in_features, rows=None, out_features=None):
    """The dense [out_features, in_features] weight of a fan-in pattern (tests, export)."""
    n_rows, k = values.shape
    out_features = n_rows if out_features is None else out_features
    rows = torch.arange(n_rows, device=values.device) if rows is None else rows.long()
    w = values.new_zeros(out_features, in_features)
    w[rows[:, None].expand(n_rows, k), indices.long()] = values
    return w


@triton.jit
def fanin_fwd_kernel(
    x_ptr, values_ptr, indices_ptr, rows_ptr, y_ptr,
    T, n_rows, K, K_CHUNK,
    stride_xt, stride_xi, stride_ys, stride_yt, stride_yo,
    HAS_ROWS: tl.constexpr, EVEN_T: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, NUM_STAGES: tl.constexpr, UNROLL: tl.constexpr,
    ACC: tl.constexpr,
):
    """Constant fan-in forward: y[s, t, rows[r]] = sum over j in split s of values[r, j] * x[t, indices[r, j]].

    Grid: (cdiv(n_rows, BLOCK_R), cdiv(T, BLOCK_T), splits) with splits = cdiv(K, K_CHUNK);
    program (i, j, s) computes stored rows [i * BLOCK_R, (i + 1) * BLOCK_R) for tokens
    [j * BLOCK_T, (j + 1) * BLOCK_T) over fan-in positions [s * K_CHUNK, (s + 1) * K_CHUNK).
    Nothing is checked here (``fanin_fwd`` checks, then launches this).

    Args:
        x_ptr: x, element (t, i) at t * stride_xt + i * stride_xi: a row-major [T, in] tensor
            or a token-contiguous copy (x^T [in, T] in memory); fp16, bf16, fp32 or fp64.
        values_ptr: values [n_rows, K], contiguous, the dtype of x.
        indices_ptr: int32 [n_rows, K], contiguous: row r's K distinct input columns, each in
            [0, in) (an index out of range reads out of bounds).
        rows_ptr: int32 [n_rows]: the distinct output column of each stored row, in [0, out);
            read only when HAS_ROWS (pass any tensor otherwise).
        y_ptr: y, element (s, t, o) at s * stride_ys + t * stride_yt + o * stride_yo, [splits,
            T, out]: the output dtype for one split, an fp32 (fp64) buffer the caller sums over
            s for several. Columns not in rows are not written: zero them first.
        T: int, tokens (>= 1). n_rows: int, stored rows (>= 1). K: int, fan-in k (>= 1).
        K_CHUNK: int, fan-in positions per split (>= 1; K for no split).
        stride_xt, stride_xi, stride_ys, stride_yt, stride_yo: int element strides of x and y.
        HAS_ROWS: constexpr bool: False means rows = arange(n_rows) (contiguous stores).
        EVEN_T: constexpr bool: T % BLOCK_T == 0 (no token mask in the loop).
        INDEX_64: constexpr bool: int64 offsets, needed when an element offset of x, y or
            values can reach 2**31.
        BLOCK_T, BLOCK_R: constexpr ints, powers of two: tokens and stored rows per program.
        NUM_STAGES: constexpr int >= 1, software-pipelining stages of the fan-in loop.
        UNROLL: constexpr int >= 1, unroll factor of the fan-in loop.
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 x).
    """
    # Grid (row tiles, token tiles, K splits): row tiles vary fastest, so the programs running
    # together share one token tile of x (in L2). A K split (small T) writes its partial sum
    # to its own slice of y (stride_ys); the launcher adds the slices in a fixed order.
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_t = offs_t < T
    mask_r = offs_r < n_rows
    # Rows past the end read the last row (in range, no mask in the loop) and are not stored.
    r_safe = tl.minimum(offs_r, n_rows - 1)
    if INDEX_64:
        r_safe = r_safe.to(tl.int64)
        offs_t = offs_t.to(tl.int64)
    k_start = pid_s * K_CHUNK
    k_end = tl.minimum(k_start + K_CHUNK, K)
    row_start = r_safe * K  # [BR]
    x_rows = x_ptr + offs_t[:, None] * stride_xt  # [BT, 1]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for j in tl.range(k_start, k_end, num_stages=NUM_STAGES, loop_unroll_factor=UNROLL):
        col = tl.load(indices_ptr + row_start + j)  # [BR]
        v = tl.load(values_ptr + row_start + j).to(ACC)  # [BR]
        if INDEX_64:
            col = col.to(tl.int64)
        if EVEN_T:
            xg = tl.load(x_rows + col[None, :] * stride_xi)
        else:
            xg = tl.load(x_rows + col[None, :] * stride_xi, mask=mask_t[:, None], other=0.0)
        # Upcast right after the load: the interpreter computes bf16 on raw bits otherwise.
        acc += xg.to(ACC) * v[None, :]  # [BT, BR]
    if HAS_ROWS:
        out_col = tl.load(rows_ptr + r_safe)
        if INDEX_64:
            out_col = out_col.to(tl.int64)
    else:
        out_col = r_safe
    tl.store(y_ptr + pid_s * stride_ys + offs_t[:, None] * stride_yt + out_col[None, :] * stride_yo,
             acc.to(y_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_r[None, :])


@triton.jit
def fanin_dx_kernel(
    dy_ptr, values_ptr, ell_ptr, slice_start_ptr, slice_width_ptr, slot_col_ptr, dx_ptr,
    T, J_CHUNK,
    stride_dyt, stride_dyo, stride_dxs, stride_dxt, stride_dxi,
    EVEN_T: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, NUM_STAGES: tl.constexpr, UNROLL: tl.constexpr,
    ACC: tl.constexpr,
):
    """Constant fan-in input gradient dx = dy W, a gather over W^T (no atomics, deterministic).

    Grid: (n_slices, cdiv(T, BLOCK_T), splits) with n_slices = cdiv(in, BLOCK_R) and splits =
    cdiv(max fan-out, J_CHUNK); program (c, j, s) computes input columns slot_col[c * BLOCK_R
    + i] for tokens [j * BLOCK_T, (j + 1) * BLOCK_T) over fan-out entries [s * J_CHUNK,
    (s + 1) * J_CHUNK) of its slice. The index arrays are ``fanout_structure(indices, rows,
    in, BLOCK_R, zero_row=out)``, built with the same BLOCK_R. Nothing is checked here
    (``fanin_dx`` builds the index, pads dy, launches this).

    Args:
        dy_ptr: dy with one zero row appended, [T, out + 1] (element (t, o) at t * stride_dyt
            + o * stride_dyo; column out all zeros: the padding entries read it); fp16, bf16,
            fp32 or fp64.
        values_ptr: values [n_rows, k], contiguous, the dtype of dy.
        ell_ptr: int64 [entries], fanout_structure's ell: (flat value position) | (output
            neuron << 32).
        slice_start_ptr: int64 [n_slices], first ell entry of each slice.
        slice_width_ptr: int32 [n_slices], each slice's largest fan-out.
        slot_col_ptr: int32 [n_slices * BLOCK_R], the input column of each slot, -1 padding.
        dx_ptr: dx, element (s, t, i) at s * stride_dxs + t * stride_dxt + i * stride_dxi,
            [splits, T, in]: the output dtype for one split, an fp32 (fp64) buffer the caller
            sums over s for several.
        T: int, tokens (>= 1). J_CHUNK: int, fan-out entries per split (>= 1).
        stride_dyt, stride_dyo, stride_dxs, stride_dxt, stride_dxi: int element strides.
        EVEN_T: constexpr bool: T % BLOCK_T == 0 (no token mask in the loop).
        INDEX_64: constexpr bool: int64 offsets, needed when an element offset can reach 2**31.
        BLOCK_T: constexpr int, power of two: tokens per program.
        BLOCK_R: constexpr int, power of two: input columns (slots) per slice, as built.
        NUM_STAGES: constexpr int >= 1, software-pipelining stages of the gather loop.
        UNROLL: constexpr int >= 1, unroll factor of the gather loop.
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 dy).
    """
    # dx[t, c] = sum over the output neurons o that read input column c of dy[t, o] * w[o, c]:
    # a gather over W^T like the forward's over W, no atomics. W^T is a sliced ELL (see
    # fanout_structure): BLOCK_R input columns per slice ("slots", heaviest fan-out first),
    # entry j of slot i at slice_start + j * BLOCK_R + i, packed as (flat value position) |
    # (output neuron << 32). A slot's entries past its own fan-out are padding that reads the
    # zero row the launcher appends to dy: no mask in the loop (a mask cost a compare, a
    # predicate and a register zeroing per gathered vector).
    # Grid (slices, token tiles, fan-out splits), slices fastest (they share a dy token tile).
    pid_c = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_i = tl.arange(0, BLOCK_R)
    slot = pid_c * BLOCK_R + offs_i
    col = tl.load(slot_col_ptr + slot)  # [BR] input column of each slot, -1 for padding
    width = tl.load(slice_width_ptr + pid_c)  # the slice's largest fan-out
    j_start = pid_s * J_CHUNK
    j_end = tl.minimum(j_start + J_CHUNK, width)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    if INDEX_64:
        offs_t = offs_t.to(tl.int64)
    ell_ptrs = ell_ptr + tl.load(slice_start_ptr + pid_c) + j_start * BLOCK_R + offs_i  # [BR]
    dy_rows = dy_ptr + offs_t[:, None] * stride_dyt  # [BT, 1]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=ACC)
    for j in tl.range(j_start, j_end, num_stages=NUM_STAGES, loop_unroll_factor=UNROLL):
        entry = tl.load(ell_ptrs)  # [BR] int64
        ell_ptrs += BLOCK_R
        pos = (entry & 0xFFFFFFFF).to(tl.int32)
        src = (entry >> 32).to(tl.int32)
        if INDEX_64:
            src = src.to(tl.int64)
        v = tl.load(values_ptr + pos).to(ACC)  # [BR]
        if EVEN_T:
            g = tl.load(dy_rows + src[None, :] * stride_dyo)  # [BT, BR]
        else:
            g = tl.load(dy_rows + src[None, :] * stride_dyo, mask=mask_t[:, None], other=0.0)
        acc += g.to(ACC) * v[None, :]
    if INDEX_64:
        col = col.to(tl.int64)
    tl.store(dx_ptr + pid_s * stride_dxs + offs_t[:, None] * stride_dxt + col[None, :] * stride_dxi,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & (col >= 0)[None, :])


def _check(x2, values, indices, rows, out_features):
    """Check a fan-in product's arguments; returns out_features (n_rows where it is None)."""
    rt.check_float("x", x2)
    rt.check_float("values", values)
    rt.check_dtype_match("values", values, "x", x2)
    rt.check_index("indices", indices, 2)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [n_rows, k], got shape {tuple(values.shape)}")
    if indices.shape != values.shape:
        raise ValueError(f"indices must have the shape of values {tuple(values.shape)}, got {tuple(indices.shape)}")
    n_rows = values.shape[0]
    out_features = n_rows if out_features is None else out_features
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
    if indices.dim() == 2 and rt.has_repeats(indices):
        raise ValueError("indices must hold k distinct columns in every row; found a repeated column")
    if rows is not None and rt.has_repeats(rows):
        raise ValueError("rows must be distinct output neurons; found a repeat")
    return out_features


# Programs to aim for before the reduction is split: two per SM of a 132-SM H100 / H200; 4
# under the interpreter (programs run one by one there) so that the tests take the split path.
_TARGET_PROGRAMS_GPU = 264
_TARGET_PROGRAMS_INTERPRETER = 4
_INT32_LIMIT = 2 ** 31


def _configs(kernel: str, T: int, dtype) -> dict:
    """Launch config. ``X_T``: 1 gives the kernel token-contiguous activations (x^T [in, T]
    for the forward, dy^T [out, T] for the input gradient), so that the gathers along an
    input column (output neuron) read consecutive tokens: 128-bit loads in the sm_90 SASS at
    T = 256, where a row-major x makes every lane of a warp touch another 32-byte sector. The
    transposed copy costs one pass over the activation. Below 17 tokens there is nothing to
    coalesce along T (and x is ~200 KB, L2-resident): row-major, token tile = T. ``BLOCK_R``:
    stored rows of W per program (forward), input columns = rows of W^T (input gradient).
    ``SPLIT``: 0 = split the fan-in (fan-out) loop until the grid has ~2 programs per SM (the
    partial sums are added in a fixed order: deterministic). ``UNROLL``: the gather loop's
    unroll factor. Under the interpreter: 0 (its
    programs run one by one: no coalescing to gain) and big tiles."""
    if rt.interpreting():
        default = {"BLOCK_T": 64, "BLOCK_R": 64, "num_warps": 4, "num_stages": 1, "X_T": 0, "SPLIT": 0,
                   "UNROLL": 1}
    elif T <= 16:
        # latency-bound (~8 warps an SM after the split): pipelined, cp.async 4-byte copies
        default = {"BLOCK_T": rt.next_pow2(T), "BLOCK_R": 128, "num_warps": 4, "num_stages": 3, "X_T": 0,
                   "SPLIT": 0, "UNROLL": 1}
    else:
        # num_stages 1: the pipelined loop (2-4 stages) moves the x / dy gathers through shared
        # memory as LDGSTS.E.BYPASS.128, which skips L1 - where a program's ~6 reads of each
        # input column hit - and adds an LDS per gathered vector (sm_90 SASS, 3072 -> 768,
        # T = 256: 4.6 instructions per FMA unpipelined vs 4.3-5.9 pipelined; 40 resident
        # warps an SM at 48 registers hide the latency instead). bench/sweep.py times 2-4.
        # UNROLL 2 (tl.range's loop_unroll_factor): the loop's 64-bit pointer steps and branch
        # are shared by two steps - forward 4.6 -> 2.8 instructions per FMA (fp32; bf16 4.4 ->
        # 3.7), input gradient 3.6 -> 3.4 (bf16 4.2 -> 4.0), same shape.
        default = {"BLOCK_T": 32, "BLOCK_R": 64, "num_warps": 4, "num_stages": 1, "X_T": 1, "SPLIT": 0,
                   "UNROLL": 2}
    return rt.launch_config(kernel, {"T": rt.shape_bucket(T), "dtype": str(dtype)[6:]}, default)


def _split(requested: int, n_programs: int, n_steps: int) -> tuple[int, int]:
    """(splits, steps per split) of a reduction of ``n_steps`` over ``n_programs`` tiles: the
    table's ``requested`` count, else enough for the target program count, at least 8 steps
    each."""
    target = _TARGET_PROGRAMS_INTERPRETER if rt.interpreting() else _TARGET_PROGRAMS_GPU
    splits = requested if requested > 0 else -(-target // max(n_programs, 1))
    splits = max(1, min(splits, -(-n_steps // 8) if not rt.interpreting() else n_steps))
    chunk = -(-n_steps // splits)
    return -(-n_steps // chunk), chunk


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset of ``t`` (the int32 bound of its index arithmetic)."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)


def _rows_are_identity(rows, out_features: int) -> bool:
    """rows == arange(out_features): the forward then stores contiguous output columns (a
    coalesced store) and reads no row list. Cached per pattern (one device sync per mask update)."""
    if rows is None:  # arange(n_rows): the first n_rows outputs, the others ablated
        return True
    if rows.numel() != out_features:
        return False
    return rt.cached_pattern((rows,), ("identity", out_features), lambda: bool(
        torch.equal(rows, torch.arange(out_features, dtype=rows.dtype, device=rows.device))))


def fanin_fwd(x2, values, indices, rows=None, out_features: int | None = None) -> torch.Tensor:
    """Launcher of ``fanin_fwd_kernel``: check, allocate, pick the launch config (the
    per-device table, else a default), launch, add the split partial sums in a fixed order.
    No autograd (``fanin_matmul`` is the differentiable op).

    Args:
        x2: [T, in], fp16, bf16, fp32 or fp64, any strides; T may be 0.
        values: [n_rows, k], the dtype of x2 (made contiguous).
        indices: int32 [n_rows, k]: k distinct columns per row, each in [0, in) (range and
            repeats checked unless ``kernels.set_checks(False)``).
        rows: int32 [n_rows], distinct output neurons in [0, out_features), or None (the
            default) for arange(n_rows): no ablated neuron.
        out_features: int >= n_rows, the width of y (default n_rows); outputs not in rows
            are 0 (ablated).
    Returns:
        y: [T, out_features] in x2's dtype, accumulated in fp32 (fp64 for fp64).
    Raises:
        ValueError / TypeError naming the argument on a bad shape, dtype, device or index.

    Example:
        >>> idx = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32)
        >>> y = fanin_fwd(torch.randn(5, 4), torch.randn(2, 2), idx)  # [5, 2]
    """
    out_features = _check(x2, values, indices, rows, out_features)
    T, (n_rows, K) = x2.shape[0], values.shape
    if T == 0 or n_rows == 0 or K == 0:
        return torch.zeros(T, out_features, dtype=x2.dtype, device=x2.device)
    values, indices = values.contiguous(), indices.contiguous()
    has_rows = not _rows_are_identity(rows, out_features)
    cfg = _configs("fanin_fwd", T, x2.dtype)
    block_t, block_r = cfg["BLOCK_T"], cfg["BLOCK_R"]
    tiles = (triton.cdiv(n_rows, block_r), triton.cdiv(T, block_t))
    splits, k_chunk = _split(cfg["SPLIT"], tiles[0] * tiles[1], K)
    # one partial sum per split, added below in split order; ablated neurons stay 0
    acc_torch = rt.acc_dtype(x2.dtype)
    if splits > 1:
        y = torch.zeros(splits, T, out_features, dtype=acc_torch, device=x2.device)
    else:
        y = (torch.zeros if n_rows < out_features else torch.empty)(1, T, out_features, dtype=x2.dtype, device=x2.device)
    # x[t, i] at x + t * stride_t + i * stride_i, from x itself or from a token-contiguous copy
    xs, (stride_t, stride_i) = (x2, x2.stride()) if not cfg["X_T"] else _token_contiguous(x2)
    index_64 = max(_extent(xs), _extent(y), values.numel()) >= _INT32_LIMIT
    fanin_fwd_kernel[(tiles[0], tiles[1], splits)](
        xs, values, indices, rows if has_rows else indices, y, T, n_rows, K, k_chunk,
        stride_t, stride_i, y.stride(0), y.stride(1), y.stride(2),
        HAS_ROWS=has_rows, EVEN_T=T % block_t == 0, INDEX_64=index_64, BLOCK_T=block_t, BLOCK_R=block_r,
        NUM_STAGES=cfg["num_stages"], UNROLL=cfg["UNROLL"], ACC=acc_dtype(x2.dtype), num_warps=cfg["num_warps"])
    return y[0] if splits == 1 else y.sum(0).to(x2.dtype)


def fanout_structure(indices, rows, in_features: int, block_r: int, zero_row: int):
    """W^T of a fan-in pattern as a sliced ELL, the input gradient's gather index. O(nnz): one
    bincount, one stable argsort of the columns, scatters.

    Args:
        indices: int32 or int64 [n_rows, k], each in [0, in_features).
        rows: int32 or int64 [n_rows] output neuron of each stored row, or None (arange).
        in_features: int, the input width (slots).
        block_r: int >= 1, slots per slice: the BLOCK_R the kernel is launched with.
        zero_row: int, the row of dy that holds zeros (``out``: the launcher appends it).

    The input columns (W^T's rows, "slots") are ordered by fan-out, heaviest first, and cut into
    slices of ``block_r``: a slice is padded only to its own largest fan-out (near its mean,
    the counts being sorted), and the heaviest slices start first (load balance when a pattern
    concentrates on a few inputs). Within a column the entries keep the order of the output
    neurons: a fixed summation order, bitwise-reproducible gradients.

    Returns (slot_col [S] int32: the input column of each slot, -1 padding; slot_count [S]
    int32: its fan-out; slice_start [S / block_r] int64: first entry of each slice;
    slice_width [S / block_r] int32: its largest fan-out; ell [entries] int64: entry j of
    slot i of slice s at slice_start[s] + j * block_r + i, holding (flat position p = r * k + j'
    of the value in ``values``) | (output neuron rows[r] << 32); padding holds position 0 and
    neuron ``zero_row``, a row of zeros the caller appends to dy; max_width: the largest
    fan-out, an int). A padding entry adds values[0] * 0: an inf / NaN in values[0] would
    reach the padded columns too (the reference spreads it to its own columns only).
    """
    n_rows, K = indices.shape
    device = indices.device
    flat_col = indices.reshape(-1).long()
    nnz = flat_col.numel()
    counts = torch.bincount(flat_col, minlength=in_features)  # [in] fan-out of each input
    slot_count, slot_col = torch.sort(counts, descending=True, stable=True)
    n_slices = triton.cdiv(in_features, block_r)
    pad = n_slices * block_r - in_features
    slot_count = torch.cat([slot_count, slot_count.new_zeros(pad)])
    slot_col = torch.cat([slot_col, slot_col.new_full((pad,), -1)])
    slice_width = slot_count.view(n_slices, block_r)[:, 0]  # the first slot of a slice is its heaviest
    slice_size = slice_width * block_r
    slice_start = torch.cumsum(slice_size, 0) - slice_size
    order = torch.argsort(flat_col, stable=True)  # flat positions, grouped by column, rows ascending
    col_of = flat_col[order]
    col_start = torch.cumsum(counts, 0) - counts
    j_of = torch.arange(nnz, device=device) - col_start[col_of]  # rank within its column
    slot_of_col = torch.empty(in_features, dtype=torch.int64, device=device)
    slot_of_col[slot_col[:in_features]] = torch.arange(in_features, device=device)
    slot = slot_of_col[col_of]
    dest = slice_start[slot // block_r] + j_of * block_r + slot % block_r
    out_of_row = torch.arange(n_rows, device=device) if rows is None else rows.long()
    ell = torch.full((int(slice_size.sum()),), zero_row << 32, dtype=torch.int64, device=device)
    ell[dest] = order | (out_of_row[order // K] << 32)
    max_width = int(slice_width[0]) if n_slices else 0  # kept as an int: no device sync per call
    return (slot_col.to(torch.int32), slot_count.to(torch.int32), slice_start,
            slice_width.to(torch.int32), ell, max_width)


def _cached_fanout(indices, rows, in_features: int, block_r: int, zero_row: int):
    """fanout_structure, built once per pattern: rt.cached_pattern rebuilds it whenever the
    layer's indices / rows tensors change (a mask update, an ablation), in place or not. It
    runs inside the custom op's real call, never while tracing."""
    tensors = (indices,) if rows is None else (indices, rows)
    return rt.cached_pattern(tensors, ("fanout", in_features, block_r, zero_row),
                             lambda: fanout_structure(indices, rows, in_features, block_r, zero_row))


def fanin_dx(dy, values, indices, rows=None, in_features: int | None = None) -> torch.Tensor:
    """Launcher of ``fanin_dx_kernel``: dx = dy W. No atomics: a gather over W^T
    (fanout_structure, cached per pattern); deterministic. No autograd, no argument checks
    beyond the forward's (it runs inside the custom op's backward, after ``fanin_fwd`` checked
    the same pattern).

    Args:
        dy: [T, out], fp16, bf16, fp32 or fp64; T may be 0.
        values: [n_rows, k], the dtype of dy.
        indices: int32 [n_rows, k]: k distinct columns per row, each in [0, in_features).
        rows: int32 [n_rows], distinct output neurons in [0, out), or None (the default:
            arange).
        in_features: int, the width of dx (required: the pattern does not tell it).
    Returns:
        dx: [T, in_features] in dy's dtype, accumulated in fp32 (fp64 for fp64).
    """
    if in_features is None:
        raise ValueError("fanin_dx needs in_features=, the width of dx (the indices do not tell it)")
    T, (n_rows, K) = dy.shape[0], values.shape
    if T == 0 or n_rows == 0 or K == 0:
        return torch.zeros(T, in_features, dtype=dy.dtype, device=dy.device)
    values, indices = values.contiguous(), indices.contiguous()
    cfg = _configs("fanin_dx", T, dy.dtype)
    block_t, block_r = cfg["BLOCK_T"], cfg["BLOCK_R"]
    n_out = dy.shape[1]
    slot_col, _, slice_start, slice_width, ell, max_width = _cached_fanout(indices, rows, in_features, block_r, n_out)
    tiles = (slice_width.numel(), triton.cdiv(T, block_t))
    splits, j_chunk = _split(cfg["SPLIT"], tiles[0] * tiles[1], max(max_width, 1))
    acc_torch = rt.acc_dtype(dy.dtype)
    dx = torch.empty(splits, T, in_features, dtype=acc_torch if splits > 1 else dy.dtype, device=dy.device)
    # dy with a zero row n_out appended (the padding's source), token-contiguous (X_T) or not:
    # the copy X_T makes anyway, one small extra pass otherwise (T <= 16)
    if cfg["X_T"]:
        dys = torch.empty(n_out + 1, T, dtype=dy.dtype, device=dy.device)
        dys[:n_out].copy_(dy.t())
        dys[n_out].zero_()
        stride_t, stride_o = 1, T
    else:
        dys = torch.empty(T, n_out + 1, dtype=dy.dtype, device=dy.device)
        dys[:, :n_out].copy_(dy)
        dys[:, n_out].zero_()
        stride_t, stride_o = n_out + 1, 1
    index_64 = max(_extent(dys), _extent(dx), ell.numel(), values.numel()) >= _INT32_LIMIT
    fanin_dx_kernel[(tiles[0], tiles[1], splits)](
        dys, values, ell, slice_start, slice_width, slot_col, dx, T, j_chunk,
        stride_t, stride_o, dx.stride(0), dx.stride(1), dx.stride(2),
        EVEN_T=T % block_t == 0, INDEX_64=index_64, BLOCK_T=block_t, BLOCK_R=block_r,
        NUM_STAGES=cfg["num_stages"], UNROLL=cfg["UNROLL"], ACC=acc_dtype(dy.dtype), num_warps=cfg["num_warps"])
    return dx[0] if splits == 1 else dx.sum(0).to(dy.dtype)


def _output_crow(indices, rows, out_features: int):
    """Row pointers of the CSR over all ``out_features`` outputs, an ablated neuron's row empty
    (so the product writes y whole, no scatter of the stored rows into it): for ``rows`` None
    or ascending (as FanInLinear and SRigL keep them); None for rows in another order. Cached
    per pattern; the values and indices are then the CSR's as they are stored."""
    n_rows, K = indices.shape

    def build():
        if rows is None:
            r = torch.arange(n_rows, device=indices.device)
        else:
            r = rows.long()
            if n_rows > 1 and not bool((r[1:] > r[:-1]).all()):
                return None
        outputs = torch.arange(out_features + 1, device=indices.device)
        return (torch.searchsorted(r, outputs) * K).to(index_dtype(n_rows * K))
    tensors = (indices,) if rows is None else (indices, rows)
    return rt.cached_pattern(tensors, ("fanin output crow", out_features), build)


def fanin_fwd_torch(x2, values, indices, rows, out_features: int) -> torch.Tensor:
    """CPU path: a CSR product (the fan-in rows are CSR rows of length k, in the stored order:
    nothing is sorted or gathered; the int32 indices are used as they are). One token is
    MKL's sparse matrix-vector product, the batch-1 inference case."""
    _check(x2, values, indices, rows, out_features)
    T, (n_rows, K) = x2.shape[0], values.shape
    if T == 0 or n_rows == 0 or K == 0:
        return x2.new_zeros(T, out_features)
    crow = _output_crow(indices, rows, out_features)
    if crow is not None:  # (Linear 3072 -> 768 at 90%, 32 tokens: the scatter was 0.13 of 0.65 ms)
        y = csr_matmul(crow, indices.reshape(-1), values.reshape(-1), out_features, x2.shape[1], x2.t()).t()
        return y.to(x2.dtype).contiguous()
    crow = torch.arange(0, n_rows * K + 1, K, device=x2.device, dtype=index_dtype(n_rows * K))
    part = csr_matmul(crow, indices.reshape(-1), values.reshape(-1), n_rows, x2.shape[1], x2.t()).t()
    y = x2.new_zeros(T, out_features, dtype=part.dtype)
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
    # (index_select: 0.26 ms at 236k values, one thread; values[order] took 1.06)
    vals = values.reshape(-1) if order is None else values.reshape(-1).index_select(0, order)
    return csr_matmul(crow, src_rows, vals, in_features, dy.shape[1], dy.t()).t().contiguous()


def _fanin_dw(dy, x2, indices, rows):
    n_rows, K = indices.shape

    def build():  # each stored weight's output neuron and column, once per pattern (the same tensors
        # each call, so the SDDMM's range checks and row pointers are kept too)
        out_of_row = torch.arange(n_rows, device=indices.device, dtype=torch.int32) if rows is None else rows
        return out_of_row.repeat_interleave(K), indices.reshape(-1)
    flat_rows, flat_cols = rt.cached_pattern((indices,) if rows is None else (indices, rows), "fanin flat", build)
    return sddmm(dy, x2, flat_rows, flat_cols).reshape(n_rows, K)


@rt.backend_op("alwayssparse::fanin_dx", fanin_dx, 4)
def _fanin_dx_op(dy: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor | None, in_features: int) -> torch.Tensor:
    return fanin_dx_torch(dy, values, indices, rows, in_features)


@rt.backend_op("alwayssparse::fanin_matmul", fanin_fwd, 4)
def _fanin_op(x2: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
              rows: torch.Tensor | None, out_features: int) -> torch.Tensor:
    return fanin_fwd_torch(x2, values, indices, rows, out_features)


rt.register_linear_autograd(_fanin_op, _fanin_dx_op, _fanin_dw)


def fanin_matmul(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                 rows: torch.Tensor | None = None, out_features: int | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Constant fan-in sparse product y = x W^T (+ bias) with W stored condensed.

    Args:
        x: [..., in].
        values: [n_rows, k], same dtype as x.
        indices: int32 [n_rows, k], distinct columns per row, each in [0, in).
        rows: int32 [n_rows] distinct output neurons of the stored rows, or None for
            ``arange(n_rows)``. Neurons absent from ``rows`` are ablated and output 0.
        out_features: width of y; defaults to n_rows.
        bias: [out_features] or None, added in y's dtype (module.bias_add: in place on CPU).
    Returns:
        y: [..., out_features]. Differentiable in x, values and bias.

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
    check_bias(bias, out_features)
    rt.check_same_device(x=x, values=values, indices=indices, rows=rows, bias=bias)
    lead = x.shape[:-1]
    x2 = rt.flatten_tokens(x)
    y = bias_add(_fanin_op(x2, values, indices, rows, out_features), bias)
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
    format = "fanin"
    pattern_buffers = ("indices", "rows")

    def __init__(self, in_features: int, out_features: int, density: float | None = None, *,
                 k: int | None = None, bias: bool = True, device=None, dtype=None,
                 generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        k = stored_count("k", k, density, in_features, "in_features")
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
        return fanin_matmul(x, self.values, self.indices, self.rows, self.out_features, self.bias)

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
