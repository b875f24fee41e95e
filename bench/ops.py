"""The benchmarked products: one ``Case`` per (op, shape, tokens, sparsity, block, dtype,
ablation), and the ``Problem`` that holds its tensors, its kernel launch, its references and
its baselines.

Ops (format x product):
    fanin_fwd  y  = x W^T      constant fan-in (SRigL)      kernel fanin_fwd
    fanin_dx   dx = dy W                                    kernel fanin_dx
    fanin_dw   dW at the stored coordinates (SDDMM)         kernel sddmm
    diag_fwd   y  = x W^T      wrap-around (block-)diagonal  kernel diag_fwd
    diag_dx    dx = dy W       (DynaDiag)                   kernel diag_dx
    diag_dw    dW at the stored blocks (the layer's)       kernel diag_dw (sddmm for b = 1)
    diag_score DynaDiag's growth score: the block SDDMM at   kernel sddmm_block (sddmm for b = 1)
               a diagonal's blocks (timed at the stored ones, the same cost as candidates)
    sparse_dw  dW at unstructured coordinates (SDDMM)       kernel sddmm
    mlp_fwd    y  = fc2(gelu(fc1(x))), both layers          kernel fused_diag_mlp
               block-diagonal (b >= 16), hidden on chip
(The unstructured forward and input grad are torch.sparse CSR: they are the CSR baseline.)
An mlp case reads in_features as the model width (dim) and out_features as the hidden width:
fc1 is dim -> hidden, fc2 hidden -> dim, each with K = diagonals_for_density diagonals.

Baselines, timed on the same inputs: ``dense`` - torch.matmul with a dense [out, in] weight
(cuBLAS on a GPU), the product a dense layer computes (for dW the full dense gradient; for
the MLP two F.linear, i.e. nn.Linear's cuBLAS GEMM with the bias, around F.gelu);
``csr`` - torch.sparse CSR with the same pattern (spmm for fwd/dx, sampled_addmm for dW);
``surv`` (fan-in only) - a dense GEMM restricted to the surviving (non-ablated) neurons;
``unfused`` (MLP only) - the library's unfused path, kernels.diag_fwd + bias + GELU +
kernels.diag_fwd + bias, the [T, hidden] activation through memory. ``unfused`` runs our
own kernels (with the table's diag_fwd configs), so it is gated like the kernel before it
is timed (GATED_BASELINES); the torch baselines are not.

The kernel's launch config is not chosen here: the launcher looks it up itself (from the
table, or from ``common.forced_config`` while the sweep tries a candidate).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from bench import common
from kernels.coords import random_rows_of_distinct, sample_distinct
from kernels.diag import diag_coords, diag_geometry, diag_to_dense, diagonals_for_density
from kernels.fanin import fanin_to_dense
from kernels.fused import MIN_BLOCK_SIZE as MIN_FUSED_BLOCK
from kernels.sparse import sparse_to_dense

OPS = ("fanin_fwd", "fanin_dx", "fanin_dw", "diag_fwd", "diag_dx", "diag_dw", "diag_score", "sparse_dw", "mlp_fwd")
BASELINES = ("dense", "csr", "surv", "unfused")
GATED_BASELINES = ("unfused",)


@dataclass(frozen=True)
class Case:
    op: str              # one of OPS
    in_features: int     # W is [out, in]; y = x W^T (mlp: the model width dim)
    out_features: int    # (mlp: the hidden width; fc1 is dim -> hidden, fc2 hidden -> dim)
    tokens: int          # T: rows of x (batch x sequence)
    sparsity: float      # fraction of W's entries that are zero (mlp: of each layer's)
    block: int = 1       # diagonal block size b (diag and mlp ops only)
    dtype: str = "bfloat16"
    ablation: float = 0.0  # fan-in: fraction of output neurons ablated (k grows to keep nnz)

    @property
    def format(self) -> str:
        return self.op.split("_")[0]

    @property
    def product(self) -> str:
        """fwd, dx or dw (a growth score is a weight gradient at other coordinates)."""
        product = self.op.split("_")[1]
        return "dw" if product == "score" else product

    def valid(self) -> bool:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; choose from {OPS}")
        if self.format not in ("diag", "mlp") and self.block != 1:
            return False
        if self.format != "fanin" and self.ablation:
            return False
        if self.format == "mlp" and self.block < MIN_FUSED_BLOCK:
            return False
        if self.format in ("diag", "mlp"):
            return self.in_features % self.block == 0 and self.out_features % self.block == 0
        return True

    def label(self) -> str:
        shape = f"{self.in_features}->{self.out_features}"
        if self.format == "mlp":
            shape += f"->{self.in_features}"
        s = f"{self.op} {shape} T={self.tokens} s={self.sparsity:g}"
        if self.format in ("diag", "mlp"):
            s += f" b={self.block}"
        if self.ablation:
            s += f" abl={self.ablation:g}"
        return s + f" {self.dtype}"

    def fields(self) -> dict:
        return dataclasses.asdict(self)


def _dense_product(product: str, x, dy, w, rows: str = ""):
    """(fn, note) of the dense matmul a product stands against; ``rows`` names a subset of
    W's rows ("_active": the surviving neurons) in the note."""
    if product == "fwd":
        return lambda: torch.matmul(x, w.t()), f"x @ W{rows}^T"
    if product == "dx":
        return lambda: torch.matmul(dy, w), f"dy{rows} @ W{rows}"
    return lambda: torch.matmul(dy.t(), x), f"dy{rows}^T @ x" + ("" if rows else " (full dense dW)")


class Problem:
    """Tensors of one case on ``device``, built from a fixed seed (the same case always gets
    the same tensors). ``run()`` launches the kernel through its public launcher."""

    def __init__(self, case: Case, device: torch.device, seed: int = 0):
        if not case.valid():
            raise ValueError(f"invalid case {case}")
        self.case = case
        self.device = device
        self.dtype = common.parse_dtype(case.dtype)
        g = torch.Generator().manual_seed(seed)  # the pattern (small): on the CPU
        c, dt = case, self.dtype
        T, n_in, n_out = c.tokens, c.in_features, c.out_features
        target_nnz = max(1, round((1.0 - c.sparsity) * n_in * n_out))
        # Activations (up to 50,432 x 3072) are drawn on the device itself.
        g_act = torch.Generator(device=device).manual_seed(seed + 1)
        self.x = torch.randn(T, n_in, generator=g_act, device=device).to(dt)
        # The MLP forward has no gradient input (and at T = 50,432 a [T, hidden] one is 0.3 GB).
        self.dy = None if c.format == "mlp" else torch.randn(T, n_out, generator=g_act, device=device).to(dt)
        self.surv_rows = None
        if c.format == "fanin":
            n_rows = max(1, n_out - round(c.ablation * n_out))
            k = max(1, min(n_in, target_nnz // n_rows))
            self.rows = torch.randperm(n_out, generator=g)[:n_rows].sort().values.to(device, torch.int32)
            self.indices = random_rows_of_distinct(n_rows, n_in, k, generator=g, device=device)
            self.values = (torch.rand(n_rows, k, generator=g) * 2 - 1).div(math.sqrt(k)).to(device, dt)
            self.coord_rows = self.rows.repeat_interleave(k)
            self.coord_cols = self.indices.reshape(-1)
            self.nnz = n_rows * k
            self.index_bytes = 4 * (self.nnz + n_rows)
            self.surv_rows = self.rows
            self.params = f"k={k} active={n_rows}/{n_out}"
        elif c.format == "diag":
            b = c.block
            R, C, D, P = diag_geometry(n_in, n_out, b)
            self.values, self.offsets = _diag_layer(n_in, n_out, b, c.sparsity, g, device, dt)
            K = len(self.offsets)
            brows, bcols = diag_coords(self.offsets, R, C)
            self.coord_rows, self.coord_cols = brows.reshape(-1), bcols.reshape(-1)
            self.nnz = K * D * b * b
            self.index_bytes = 4 * K if c.product != "dw" else 8 * K * D
            self.params = f"K={K}/{P} D={D}"
        elif c.format == "mlp":
            b = c.block
            # fc1: dim -> hidden, fc2: hidden -> dim, biases in [-0.5, 0.5) (as bench/fused_mlp.py).
            self.layers = []
            for l_in, l_out in ((n_in, n_out), (n_out, n_in)):
                values, offsets = _diag_layer(l_in, l_out, b, c.sparsity, g, device, dt)
                bias = (torch.rand(l_out, generator=g) - 0.5).to(device, dt)
                self.layers.append((values, offsets, bias))
            (v1, off1, _), (v2, off2, _) = self.layers
            self.nnz = v1.numel() + v2.numel()
            self.index_bytes = 4 * (len(off1) + len(off2))
            P1, P2 = diag_geometry(n_in, n_out, b)[3], diag_geometry(n_out, n_in, b)[3]
            self.params = f"K1={len(off1)}/{P1} K2={len(off2)}/{P2}"
        else:
            flat = sample_distinct(n_in * n_out, target_nnz, generator=g).to(device)
            self.coord_rows = (flat // n_in).to(torch.int32)
            self.coord_cols = (flat % n_in).to(torch.int32)
            self.values = ((torch.rand(target_nnz, generator=g) * 2 - 1) / math.sqrt(target_nnz / n_out)).to(device, dt)
            self.nnz = target_nnz
            self.index_bytes = 8 * target_nnz
            self.params = f"nnz={target_nnz}"
        self.density = self.nnz / (n_in * n_out * (2 if c.format == "mlp" else 1))

    def run(self) -> torch.Tensor:
        c, p = self.case, self
        if c.op == "fanin_fwd":
            return kernels.fanin_fwd(p.x, p.values, p.indices, p.rows, c.out_features)
        if c.op == "fanin_dx":
            return kernels.fanin_dx(p.dy, p.values, p.indices, p.rows, c.in_features)
        if c.op == "diag_fwd":
            return kernels.diag_fwd(p.x, p.values, p.offsets, c.block, c.out_features)
        if c.op == "diag_dx":
            return kernels.diag_dx(p.dy, p.values, p.offsets, c.block, c.in_features)
        if c.op == "mlp_fwd":
            (v1, off1, b1), (v2, off2, b2) = p.layers
            return kernels.fused_diag_mlp_fwd(p.x, v1, off1, b1, v2, off2, b2, c.block, c.out_features,
                                              c.in_features)
        if c.op == "diag_dw" and c.block > 1:  # the layer's launcher; [K, D, b, b] in the coordinates' order
            return kernels.diag.diag_dw(p.dy, p.x, p.offsets, c.block).reshape(-1, c.block, c.block)
        # The other weight gradients and scores (diag_dw at b = 1 too, as the layer does) are the SDDMM.
        return kernels.sddmm_fwd(p.dy, p.x, p.coord_rows, p.coord_cols, c.block)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight this pattern stands for (for references and baselines)."""
        c = self.case
        if c.format == "mlp":
            raise ValueError("an mlp case has two weights: use dense_mlp")
        v = self.values.to(dtype)
        if c.format == "fanin":
            return fanin_to_dense(v, self.indices, c.in_features, self.rows, c.out_features)
        if c.format == "diag":
            return diag_to_dense(v, self.offsets, c.in_features, c.out_features, c.block)
        return sparse_to_dense(v, self.coord_rows, self.coord_cols, c.in_features, c.out_features)

    def dense_mlp(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(W1 [hidden, dim], b1), (W2 [dim, hidden], b2)] of an mlp case, dense, at ``dtype``."""
        c = self.case
        shapes = ((c.in_features, c.out_features), (c.out_features, c.in_features))
        return [(diag_to_dense(v.to(dtype), off, l_in, l_out, c.block), bias.to(dtype))
                for (v, off, bias), (l_in, l_out) in zip(self.layers, shapes)]

    def reference(self, dtype: torch.dtype) -> torch.Tensor:
        """The product computed by plain torch at ``dtype`` through the dense weight: fp64 is
        the truth, the kernel's dtype gives torch's own rounding error for the gate."""
        c = self.case
        if c.format == "mlp":
            (w1, b1), (w2, b2) = self.dense_mlp(dtype)
            return F.linear(F.gelu(F.linear(self.x.to(dtype), w1, b1)), w2, b2)  # exact (erf) GELU
        x, dy = self.x.to(dtype), self.dy.to(dtype)
        if c.product == "fwd":
            return x @ self.dense_weight(dtype).t()
        if c.product == "dx":
            return dy @ self.dense_weight(dtype)
        return kernels.sddmm_ref(dy, x, self.coord_rows, self.coord_cols, c.block)

    def baselines(self) -> dict[str, tuple[Callable[[], torch.Tensor], str]]:
        """{name: (fn, note)}: the competitors of this case, prepared outside the timing."""
        c, dt = self.case, self.dtype
        if c.format == "mlp":
            return self._mlp_baselines()
        out: dict[str, tuple[Callable, str]] = {}
        w = self.dense_weight(dt)
        out["dense"] = _dense_product(c.product, self.x, self.dy, w)
        csr = self._csr_baseline(w)
        if csr is not None:
            out["csr"] = csr
        if self.surv_rows is not None:
            w_s = w[self.surv_rows.long()].contiguous()  # [active, in]
            dy_s = self.dy[:, self.surv_rows.long()].contiguous()  # [T, active]
            out["surv"] = _dense_product(c.product, self.x, dy_s, w_s, "_active")
        return out

    def _mlp_baselines(self) -> dict[str, tuple[Callable[[], torch.Tensor], str]]:
        c, x = self.case, self.x
        (w1, b1), (w2, b2) = self.dense_mlp(self.dtype)
        (v1, off1, bias1), (v2, off2, bias2) = self.layers

        def unfused():
            h = kernels.diag_fwd(x, v1, off1, c.block, c.out_features)  # [T, hidden] through memory
            h = F.gelu(h.add_(bias1))
            return kernels.diag_fwd(h, v2, off2, c.block, c.in_features).add_(bias2)

        def dense():
            return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)  # cuBLAS GEMMs with the bias

        return {"dense": (dense, "nn.Linear -> gelu -> nn.Linear"),
                "unfused": (unfused, "diag_fwd + b1 -> gelu -> diag_fwd + b2")}

    def _csr_baseline(self, w: torch.Tensor):
        """torch.sparse CSR at the case's dtype, or float32 where the backend has no kernel
        for it (MKL on CPU has no fp16/bf16 SpMM); None when neither runs."""
        c = self.case
        mask = w != 0
        for dt in (self.dtype, torch.float32):
            try:
                wd = w.to(dt)
                if c.product == "fwd":
                    a, rhs = wd.to_sparse_csr(), self.x.to(dt).t().contiguous()  # [out, in] @ [in, T]
                    fn = lambda a=a, rhs=rhs: torch.sparse.mm(a, rhs)
                elif c.product == "dx":
                    a, rhs = wd.t().contiguous().to_sparse_csr(), self.dy.to(dt).t().contiguous()
                    fn = lambda a=a, rhs=rhs: torch.sparse.mm(a, rhs)
                else:
                    pattern = mask.to(dt).to_sparse_csr()
                    lhs, rhs = self.dy.to(dt).t().contiguous(), self.x.to(dt)
                    fn = lambda p=pattern, lhs=lhs, rhs=rhs: torch.sparse.sampled_addmm(p, lhs, rhs, beta=0.0)
                fn()
                note = "" if dt == self.dtype else "computed in float32 (no kernel for the dtype)"
                return fn, note
            except (RuntimeError, NotImplementedError):
                continue
        return None

    def flops(self) -> float:
        """Useful FLOPs: 2 T nnz (a dense product does 2 T in out; the MLP 2 T (nnz1 + nnz2),
        not counting the fused kernel's recomputed hidden blocks)."""
        return 2.0 * self.case.tokens * self.nnz

    def min_bytes(self) -> float:
        """Bytes a perfect kernel moves: activations in and out once, values and indices once
        (MLP: x in, y out, both layers' values, offsets and biases; the hidden stays on chip)."""
        c = self.case
        e = self.x.element_size()
        if c.format == "mlp":
            biases = c.out_features + c.in_features
            return (2 * c.tokens * c.in_features + self.nnz + biases) * e + self.index_bytes
        # fwd reads x, writes y; dx reads dy, writes dx; dW reads dy and x: T (in + out) each.
        return c.tokens * (c.in_features + c.out_features) * e + self.nnz * e + self.index_bytes


def _diag_layer(n_in: int, n_out: int, b: int, sparsity: float, g: torch.Generator, device, dtype):
    """(values [K, D, b, b], offsets int32 [K]) of one block-diagonal weight with K =
    diagonals_for_density, values uniform in +-1/sqrt(fan-in), drawn from ``g``."""
    R, C, D, P = diag_geometry(n_in, n_out, b)
    K = diagonals_for_density(n_in, n_out, b, 1.0 - sparsity)
    offsets = torch.randperm(P, generator=g)[:K].sort().values.to(device, torch.int32)
    fan_in = K * D * b / R
    values = ((torch.rand(K, D, b, b, generator=g) * 2 - 1) / math.sqrt(fan_in)).to(device, dtype)
    return values, offsets


def candidate_space(default: dict, t_max: int, block: int, quick: bool) -> list[dict]:
    """Launch configs to try, derived from the parameters the kernel's default names.

    Full: tile sides 16..256 (token tiles no larger than the tokens need), 2/4/8 warps, 2/3/4
    pipeline stages, token chunks per program for the split-T SDDMM (0 = the kernel's own
    choice, or 512 .. whole T), both activation layouts (X_T) where the kernel has the knob,
    diagonal output tiles per program (TILE_GROUP), the weight gradient's stack (G) and the
    MLP forward fused or not (UNFUSED, one candidate: unfused, the other keys do nothing), the
    weight gradient's band variant at 64 / 128 blocks or none (BANDS, one candidate each);
    tiles of at most 16K elements and at least 2 elements per thread. The default always
    comes first. Quick (interpreter): the default and one other
    token tile.
    """
    def norm(cfg):
        return tuple(sorted(cfg.items()))

    first = dict(default)
    if quick:
        other = dict(default)
        other["BLOCK_T"] = 32 if default.get("BLOCK_T") != 32 else 64
        out = [first, other]
    else:
        t_cap = max(16, 1 << max(0, int(t_max - 1).bit_length()))
        choices = {
            "BLOCK_T": [v for v in (16, 32, 64, 128, 256) if v <= t_cap],
            "BLOCK_R": [16, 32, 64, 128],
            "BLOCK_Q": [16, 32, 64, 128],
            "BLOCK_N": [16, 32, 64, 128],
            "T_CHUNK": [0] + [v for v in (512, 2048, 8192) if v < t_max] + [t_cap],
            "num_warps": [2, 4, 8],
            "num_stages": [2, 3, 4],
            "X_T": [0, 1],  # row-major activations or token-contiguous copies (fan-in, SDDMM)
            "TILE_GROUP": [0, 1, 3],  # diagonal output tiles a program runs over one x tile (0: the launcher's)
            "G": [2, 4, 8],  # diagonals stacked in one weight-gradient MMA (M = G * b)
        }
        names = [k for k in default if k in choices]
        combos = [{}]
        for name in names:
            combos = [dict(cmb, **{name: v}) for cmb in combos for v in choices[name]]
        out = [first]
        for cmb in combos:
            cfg = dict(default)
            cfg.update(cmb)
            side = cfg.get("BLOCK_R", cfg.get("BLOCK_Q", cfg.get("BLOCK_N", max(16, block))))
            tile = cfg.get("BLOCK_T", 1) * side
            if tile > 16384 or cfg.get("num_warps", 4) * 32 * 2 > tile:
                continue
            out.append(cfg)
        if "UNFUSED" in default:  # the MLP forward as its two products: one config, the tiles are theirs
            out.append(dict(default, UNFUSED=not default["UNFUSED"]))
        if "BANDS" in default:  # the weight gradient's band variant (0: the stacks), its warps with it
            out += [dict(default, BANDS=n, band_warps=w) for n, w in ((0, default["band_warps"]), (64, 8), (128, 16))
                    if n != default["BANDS"]]
    seen, unique = set(), []
    for cfg in out:
        if norm(cfg) not in seen:
            seen.add(norm(cfg))
            unique.append(cfg)
    return unique
