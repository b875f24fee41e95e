"""SDDMM: a dense-dense product sampled at a list of coordinates.

    g[i] = sum_t dy[t, rows[i]] * x[t, cols[i]]                  element form, g: [n]
    g[i] = dy[:, rows[i]*b:(rows[i]+1)*b]^T @ x[:, cols[i]*b:...]  block form, g: [n, b, b]

dy: [T, M], x: [T, N], rows / cols: int32 [n], any order, repeats allowed, n may be 0.
This one family computes the weight gradient of every sparse format (restricted to the
active coordinates) and the growth scores of every DST rule, so no dense [M, N] product is
ever formed. Accumulation is fp32; the result has the dtype of dy.

Raw kernels (for other Triton projects; each docstring gives its grid and every argument):
``sddmm_kernel`` (element form) and ``sddmm_block_kernel`` (block form), both launched by
``sddmm_fwd``.

Example:
    g = sddmm(dy, x, rows, cols)                 # [n]
    gb = sddmm(dy, x, brows, bcols, block_size=16)  # [n, 16, 16]
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import cpu as cpu_native
from . import runtime as rt
from .coords import csr_structure

# Bound on the elements of the gathered [T, chunk] temporaries of the torch path.
_TORCH_CHUNK_ELEMS = 1 << 22


def sddmm_ref(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              block_size: int = 1) -> torch.Tensor:
    """The spec: form the dense product and read it at the coordinates (tests only)."""
    full = dy.t() @ x  # [M, N]
    if block_size == 1:
        return full[rows.long(), cols.long()]
    b = block_size
    blocks = full.reshape(full.shape[0] // b, b, full.shape[1] // b, b).permute(0, 2, 1, 3)
    return blocks[rows.long(), cols.long()]


@triton.jit
def sddmm_kernel(
    dy_ptr, x_ptr, rows_ptr, cols_ptr, g_ptr,
    T, n, T_CHUNK,
    stride_dyt, stride_dym, stride_xt, stride_xn,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_T: tl.constexpr, EVEN_T: tl.constexpr,
    INDEX_64: tl.constexpr, NUM_STAGES: tl.constexpr, ACC: tl.constexpr,
):
    """Element SDDMM: g[i] = sum_t dy[t, rows[i]] * x[t, cols[i]].

    Grid: (cdiv(n, BLOCK_N), cdiv(T, T_CHUNK)); program (i, c) computes coordinates
    [i * BLOCK_N, (i + 1) * BLOCK_N) over tokens [c * T_CHUNK, (c + 1) * T_CHUNK). Nothing is
    checked here (``sddmm_fwd`` checks, then launches this).

    Args:
        dy_ptr: dy, element (t, m) at t * stride_dyt + m * stride_dym ([T, M], row-major or a
            token-contiguous copy); fp16, bf16, fp32 or fp64.
        x_ptr: x, element (t, j) at t * stride_xt + j * stride_xn ([T, N]), the dtype of dy.
        rows_ptr: int32 [n], contiguous, each in [0, M) (not checked here).
        cols_ptr: int32 [n], contiguous, each in [0, N); repeats allowed.
        g_ptr: g [n], contiguous: the result dtype with one token chunk (SPLIT_T False), an
            fp32 (fp64) buffer zeroed by the caller with several (SPLIT_T True: the chunks add
            into it with relaxed atomics).
        T: int, tokens (>= 1). n: int, coordinates (>= 1).
        T_CHUNK: int >= 1, tokens per program (T for one chunk).
        stride_dyt, stride_dym, stride_xt, stride_xn: int element strides of dy and x.
        BLOCK_N: constexpr int, power of two: coordinates per program.
        BLOCK_T: constexpr int, power of two: tokens per loop step.
        SPLIT_T: constexpr bool: more than one token chunk (atomic accumulation into g).
        EVEN_T: constexpr bool: T % T_CHUNK == 0 and T_CHUNK % BLOCK_T == 0 (no token mask).
        INDEX_64: constexpr bool: int64 offsets, needed when an element offset of dy or x can
            reach 2**31.
        NUM_STAGES: constexpr int >= 1, software-pipelining stages of the token loop.
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 dy).
    """
    # Grid (coordinate tiles, token chunks): coordinate tiles vary fastest, so the programs
    # running together read one chunk of dy and x, which stays in L2. With SPLIT_T the chunks'
    # partial sums meet in an fp32 buffer through atomics (more programs when there are few
    # coordinates), relaxed: the default acq_rel puts MEMBAR.ALL.GPU + CCTL.IVALL around
    # every one in the sm_90 SASS.
    pid_n = tl.program_id(0)
    t_start = tl.program_id(1) * T_CHUNK
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    # Coordinates past the end read the last one (in range, no mask in the loop), not stored.
    n_safe = tl.minimum(offs_n, n - 1)
    r = tl.load(rows_ptr + n_safe)
    c = tl.load(cols_ptr + n_safe)
    if INDEX_64:
        r = r.to(tl.int64)
        c = c.to(tl.int64)
    dy_cols = dy_ptr + r[None, :] * stride_dym  # [1, BN]
    x_cols = x_ptr + c[None, :] * stride_xn
    # The products accumulate per (token, coordinate) and are summed over the tokens once at
    # the end: a tl.sum per step put a cross-lane shuffle tree in the loop (15.5 instructions
    # per FMA in the sm_90 SASS at T = 256).
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=ACC)
    t_end = tl.minimum(t_start + T_CHUNK, T)
    for t0 in tl.range(t_start, t_end, BLOCK_T, num_stages=NUM_STAGES):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        if INDEX_64:
            offs_t = offs_t.to(tl.int64)
        if EVEN_T:
            a = tl.load(dy_cols + offs_t[:, None] * stride_dyt)  # [BT, BN]
            b = tl.load(x_cols + offs_t[:, None] * stride_xt)
        else:
            m = offs_t[:, None] < t_end
            a = tl.load(dy_cols + offs_t[:, None] * stride_dyt, mask=m, other=0.0)
            b = tl.load(x_cols + offs_t[:, None] * stride_xt, mask=m, other=0.0)
        # Upcast right after the load: the interpreter computes bf16 on raw bits otherwise.
        acc += a.to(ACC) * b.to(ACC)
    g = tl.sum(acc, axis=0)  # [BN]
    if SPLIT_T:
        tl.atomic_add(g_ptr + offs_n, g, mask=mask_n, sem="relaxed")
    else:
        tl.store(g_ptr + offs_n, g.to(g_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def sddmm_block_kernel(
    dy_ptr, x_ptr, rows_ptr, cols_ptr, g_ptr,
    T, n, T_CHUNK,
    stride_dyt, stride_dym, stride_xt, stride_xn,
    B: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_T: tl.constexpr,
    USE_DOT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """Block SDDMM: g[i] = dy[:, rows[i]*B:(rows[i]+1)*B]^T @ x[:, cols[i]*B:(cols[i]+1)*B], [B, B].

    Grid: (n * cdiv(T, T_CHUNK),); program p computes block coordinate p % n over tokens
    [(p // n) * T_CHUNK, (p // n + 1) * T_CHUNK). Nothing is checked here (``sddmm_fwd``
    checks, then launches this).

    Args:
        dy_ptr: dy [T, M], element (t, m) at t * stride_dyt + m * stride_dym; fp16, bf16,
            fp32 or fp64; B divides M.
        x_ptr: x [T, N], element (t, j) at t * stride_xt + j * stride_xn, the dtype of dy;
            B divides N.
        rows_ptr: int32 [n], contiguous: block rows, each in [0, M / B) (not checked here).
        cols_ptr: int32 [n], contiguous: block columns, each in [0, N / B); repeats allowed.
        g_ptr: g [n, B, B], contiguous: the result dtype with one token chunk (SPLIT_T
            False), an fp32 (fp64) buffer zeroed by the caller with several (SPLIT_T True:
            relaxed atomic adds).
        T: int, tokens (>= 1). n: int, block coordinates (>= 1).
        T_CHUNK: int >= 1, tokens per program (T for one chunk).
        stride_dyt, stride_dym, stride_xt, stride_xn: int element strides of dy and x.
        B: constexpr int >= 1, the block size.
        BLOCK_B: constexpr int, the power of two >= B the tile is padded to (>= 16 with USE_DOT).
        BLOCK_T: constexpr int, power of two (>= 16 with USE_DOT): tokens per loop step.
        SPLIT_T: constexpr bool: more than one token chunk (atomic accumulation into g).
        USE_DOT: constexpr bool: tl.dot (tensor cores on a GPU); needs B >= 16. False: an
            outer-product sum on CUDA cores.
        UPCAST: constexpr bool: cast dy and x tiles to ACC before tl.dot (the interpreter's
            bf16 is wrong; fp32 operands give an exact dot).
        DOT_PRECISION: constexpr str, tl.dot's input_precision: "ieee" or "tf32" (fp32 operands).
        ACC: constexpr triton dtype of the accumulator: tl.float32 (tl.float64 for fp64 dy).
    """
    # One program per (block coordinate, token chunk); coordinates vary fastest (see above).
    pid = tl.program_id(0).to(tl.int64)
    i = pid % n
    t_start = (pid // n) * T_CHUNK
    r = tl.load(rows_ptr + i).to(tl.int64)
    c = tl.load(cols_ptr + i).to(tl.int64)
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_B), dtype=ACC)
    t_end = tl.minimum(t_start + T_CHUNK, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        m = (offs_t[:, None] < t_end) & mask_b[None, :]
        a = tl.load(dy_ptr + offs_t[:, None] * stride_dyt + (r * B + offs_b)[None, :] * stride_dym,
                    mask=m, other=0.0)  # [BT, BB]
        b = tl.load(x_ptr + offs_t[:, None] * stride_xt + (c * B + offs_b)[None, :] * stride_xn,
                    mask=m, other=0.0)  # [BT, BB]
        if UPCAST:
            a = a.to(ACC)
            b = b.to(ACC)
        if USE_DOT:
            acc += tl.dot(tl.trans(a), b, input_precision=DOT_PRECISION, out_dtype=ACC)
        else:
            acc += tl.sum(a.to(ACC)[:, :, None] * b.to(ACC)[:, None, :], axis=0)
    offs_g = i * B * B + offs_b[:, None] * B + offs_b[None, :]
    mask_g = mask_b[:, None] & mask_b[None, :]
    if SPLIT_T:
        tl.atomic_add(g_ptr + offs_g, acc, mask=mask_g, sem="relaxed")
    else:
        tl.store(g_ptr + offs_g, acc.to(g_ptr.dtype.element_ty), mask=mask_g)


def _check(dy, x, rows, cols, block_size):
    rt.check_float("dy", dy)
    rt.check_float("x", x)
    rt.check_dtype_match("x", x, "dy", dy)
    if dy.dim() != 2 or x.dim() != 2:
        raise ValueError(f"dy and x must be 2-D [T, M] and [T, N], got {tuple(dy.shape)} and {tuple(x.shape)}")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy and x must share the token dimension T, got {dy.shape[0]} and {x.shape[0]}")
    rt.check_index("rows", rows, 1)
    rt.check_index("cols", cols, 1)
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must have one length, got {rows.numel()} and {cols.numel()}")
    rt.check_same_device(dy=dy, x=x, rows=rows, cols=cols)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if dy.shape[1] % block_size or x.shape[1] % block_size:
        raise ValueError(f"block_size={block_size} must divide dy.shape[1]={dy.shape[1]} and x.shape[1]={x.shape[1]}")
    rt.check_range("rows", rows, dy.shape[1] // block_size)
    rt.check_range("cols", cols, x.shape[1] // block_size)


def acc_dtype(dtype: torch.dtype):
    """rt.acc_dtype as a Triton dtype: a kernel's accumulator (fp64 for fp64 inputs, gradcheck)."""
    return tl.float64 if rt.acc_dtype(dtype) == torch.float64 else tl.float32


def dot_settings(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) for tl.dot: the interpreter computes bf16 wrongly, so it gets
    fp32 operands; on a GPU fp16/bf16 go to tensor cores as they are and fp32 is exact (ieee)."""
    if rt.interpreting() or dtype in (torch.float32, torch.float64):
        return True, "ieee"
    return False, "tf32"


# Programs to aim for when splitting tokens: about 16 waves on a 132-SM H100 (the sweep can
# override with an explicit T_CHUNK); small under the interpreter, where programs run one by
# one, but above 1 so that the tests exercise the split (atomic) path too.
_TARGET_PROGRAMS_GPU = 2048
_TARGET_PROGRAMS_INTERPRETER = 4


def token_chunk(T: int, n_tiles: int, block_t: int, requested: int = 0) -> int:
    """Tokens per program: ``requested`` when the table gives one (> 0), else enough chunks for
    the target program count, never below 4 token tiles per chunk."""
    if requested > 0:
        chunk = requested
    else:
        target = _TARGET_PROGRAMS_INTERPRETER if rt.interpreting() else _TARGET_PROGRAMS_GPU
        chunks = max(1, -(-target // max(n_tiles, 1)))
        chunk = max(-(-T // chunks), 1 if rt.interpreting() else 4 * block_t)
    return -(-chunk // block_t) * block_t


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset of ``t`` (the int32 bound of its index arithmetic)."""
    return 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0)


def _token_contiguous(a: torch.Tensor):
    """(copy, (stride_t, stride_i)): ``a`` [T, n] as a token-contiguous copy (a^T [n, T] in
    memory) and the strides that still address element (t, i) of ``a``."""
    at = a.t().contiguous()
    return at, (at.stride(1), at.stride(0))


def sddmm_fwd(dy, x, rows, cols, block_size: int = 1) -> torch.Tensor:
    """Launcher of ``sddmm_kernel`` (block_size 1) and ``sddmm_block_kernel``: check, allocate,
    pick the launch config (the per-device table, else a default), launch. No autograd.

    Args:
        dy: [T, M], fp16, bf16, fp32 or fp64, any strides; T may be 0.
        x: [T, N], the dtype of dy.
        rows: int32 [n]: rows (block rows when block_size > 1), each in [0, M / block_size);
            n may be 0; range checked unless ``kernels.set_checks(False)``.
        cols: int32 [n]: columns (block columns), each in [0, N / block_size); repeats allowed.
        block_size: int >= 1 that divides M and N.
    Returns:
        g: [n] (block_size 1) or [n, block_size, block_size] in dy's dtype, accumulated in
        fp32 (fp64 for fp64).
    Raises:
        ValueError / TypeError naming the argument on a bad shape, dtype, device or index.
    """
    _check(dy, x, rows, cols, block_size)
    n, T, b = rows.numel(), dy.shape[0], block_size
    shape = (n,) if b == 1 else (n, b, b)
    if n == 0:
        return torch.empty(shape, dtype=dy.dtype, device=dy.device)
    if T == 0:
        return torch.zeros(shape, dtype=dy.dtype, device=dy.device)
    rows, cols = rows.contiguous(), cols.contiguous()
    acc_torch = rt.acc_dtype(dy.dtype)
    if b == 1:
        # X_T: dy and x as token-contiguous copies, so each coordinate's T-long dot reads
        # consecutive memory (see kernels/fanin.py's _configs); worth its two transposes when
        # the coordinates outnumber the activation columns, as in every weight gradient.
        cfg = rt.launch_config("sddmm", {"dtype": str(dy.dtype)[6:], "T": rt.shape_bucket(T)},
                               {"BLOCK_N": 64 if rt.interpreting() else 32,
                                "BLOCK_T": 256 if rt.interpreting() else 64, "T_CHUNK": 0, "num_warps": 4,
                                "num_stages": 1, "X_T": 0 if rt.interpreting() else 1})
        n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
        chunk = token_chunk(T, n_tiles, cfg["BLOCK_T"], cfg["T_CHUNK"])
        n_chunks = triton.cdiv(T, chunk)
        g = (torch.zeros(shape, dtype=acc_torch, device=dy.device) if n_chunks > 1
             else torch.empty(shape, dtype=dy.dtype, device=dy.device))
        if cfg.get("X_T"):
            (dys, dy_strides), (xs, x_strides) = _token_contiguous(dy), _token_contiguous(x)
        else:
            (dys, dy_strides), (xs, x_strides) = (dy, dy.stride()), (x, x.stride())
        index_64 = max(_extent(dys), _extent(xs)) >= 2 ** 31
        sddmm_kernel[(n_tiles, n_chunks)](
            dys, xs, rows, cols, g, T, n, chunk,
            *dy_strides, *x_strides,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_T=cfg["BLOCK_T"], SPLIT_T=n_chunks > 1,
            EVEN_T=T % chunk == 0 and chunk % cfg["BLOCK_T"] == 0, INDEX_64=index_64,
            NUM_STAGES=cfg["num_stages"], ACC=acc_dtype(dy.dtype), num_warps=cfg["num_warps"])
        return g.to(dy.dtype)
    upcast, precision = dot_settings(dy.dtype)
    block_b = max(16, rt.next_pow2(b)) if b >= 16 else rt.next_pow2(b)
    cfg = rt.launch_config("sddmm_block", {"b": b, "dtype": str(dy.dtype)[6:], "T": rt.shape_bucket(T)},
                           {"BLOCK_T": 128 if rt.interpreting() else 64, "T_CHUNK": 0,
                            "num_warps": 4, "num_stages": 2})
    chunk = token_chunk(T, n, cfg["BLOCK_T"], cfg["T_CHUNK"])
    n_chunks = triton.cdiv(T, chunk)
    g = (torch.zeros(shape, dtype=acc_torch, device=dy.device) if n_chunks > 1
         else torch.empty(shape, dtype=dy.dtype, device=dy.device))
    sddmm_block_kernel[(n * n_chunks,)](
        dy, x, rows, cols, g, T, n, chunk,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
        B=b, BLOCK_B=block_b, BLOCK_T=cfg["BLOCK_T"], SPLIT_T=n_chunks > 1,
        USE_DOT=b >= 16, UPCAST=upcast, DOT_PRECISION=precision, ACC=acc_dtype(dy.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return g.to(dy.dtype)


def _sampled_dots(dy, x, rows, cols) -> torch.Tensor:
    """g[i] = dy[:, rows[i]] . x[:, cols[i]] through torch.sparse.sampled_addmm: one vectorised
    T-long dot per stored element over dy^T and x^T rows, no [M, N] product and no [T, n]
    gather (10-30x faster than gathering on CPU: 64 x 256 at 10%, T = 2176: 2.4 ms vs 23 ms).
    The pattern must be CSR (rows sorted): coordinates out of row order are sorted and the
    results put back in the callers' order. In fp32 with the native library (kernels.cpu) the
    dots are its own (token tiles, eight weights a reduction)."""
    g = cpu_native.sddmm(dy, x, rows, cols)
    if g is not None:
        return g
    M, N = dy.shape[1], x.shape[1]

    # the CSR structure of the coordinates, once per pattern
    order, crow, csr_cols = rt.cached_pattern((rows, cols), ("csr", M, N), lambda: csr_structure(rows, cols, M, N))
    pattern = torch.sparse_csr_tensor(crow, csr_cols, torch.zeros(csr_cols.numel(), dtype=dy.dtype, device=dy.device),
                                      size=(M, N), check_invariants=False)
    g = torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0).values()
    if order is None:
        return g
    out = torch.empty_like(g)
    out[order] = g
    return out


def sddmm_torch(dy, x, rows, cols, block_size: int = 1) -> torch.Tensor:
    """CPU path: gather and reduce in chunks of coordinates, never forming [M, N]."""
    _check(dy, x, rows, cols, block_size)
    T, b, n = dy.shape[0], block_size, rows.numel()
    acc_dtype = rt.acc_dtype(dy.dtype)
    if b == 1:
        if n == 0 or T == 0:
            return torch.zeros(n, dtype=dy.dtype, device=dy.device)
        g = cpu_native.sddmm(dy, x, rows, cols)  # fp32 or bf16 as they come: widened in its tiles
        if g is not None:
            return g.to(dy.dtype)
    elif n and T:
        g = cpu_native.sddmm_blocks(dy, x, rows, cols, b)  # (b a multiple of 8; bf16 widened in its pack)
        if g is not None:
            return g.to(dy.dtype)
    dyc, xc = dy.to(acc_dtype), x.to(acc_dtype)
    if b == 1:
        if n <= dy.shape[1] * x.shape[1]:  # (sampled_addmm refuses more elements than M * N)
            return _sampled_dots(dyc, xc, rows, cols).to(dy.dtype)
        out = torch.empty(n, dtype=acc_dtype, device=dy.device)
        step = max(1, _TORCH_CHUNK_ELEMS // max(T, 1))
        for s in range(0, n, step):
            r, c = rows[s:s + step].long(), cols[s:s + step].long()
            out[s:s + step] = (dyc[:, r] * xc[:, c]).sum(0)
        return out.to(dy.dtype)
    dyb = dyc.reshape(T, dy.shape[1] // b, b)
    xb = xc.reshape(T, x.shape[1] // b, b)
    out = torch.empty(n, b, b, dtype=acc_dtype, device=dy.device)
    step = max(1, _TORCH_CHUNK_ELEMS // max(T * b, 1))
    for s in range(0, n, step):
        r, c = rows[s:s + step].long(), cols[s:s + step].long()
        out[s:s + step] = torch.einsum("tni,tnj->nij", dyb[:, r], xb[:, c])
    return out.to(dy.dtype)


def _sddmm_shape(dy, x, rows, cols, block_size):
    return (rows.shape[0],) if block_size == 1 else (rows.shape[0], block_size, block_size)


@rt.backend_op("alwayssparse::sddmm", sddmm_fwd, _sddmm_shape)
def _sddmm_op(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              block_size: int) -> torch.Tensor:
    return sddmm_torch(dy, x, rows, cols, block_size)


def sddmm(dy: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
          block_size: int = 1) -> torch.Tensor:
    """Sampled dense-dense product g[i] = sum_t dy[t, rows[i]] x[t, cols[i]].

    Args:
        dy: [T, M] (or [..., M], flattened to 2-D), x: [T, N] with the same leading shape.
        rows, cols: int32 [n] coordinates, block coordinates when ``block_size > 1``.
        block_size: 1 for elements, b > 1 for b x b blocks (b must divide M and N).
    Returns:
        g: [n] or [n, b, b] in dy's dtype (accumulated in fp32).

    Example:
        >>> g = sddmm(torch.randn(8, 5), torch.randn(8, 7), rows, cols)
    """
    rt.check_float("dy", dy)
    rt.check_float("x", x)
    rt.check_same_device(dy=dy, x=x, rows=rows, cols=cols)
    if dy.dim() > 2:
        dy = rt.flatten_tokens(dy)
    if x.dim() > 2:
        x = rt.flatten_tokens(x)
    return _sddmm_op(dy, x, rows, cols, block_size)
