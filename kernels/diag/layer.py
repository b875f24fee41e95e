"""DiagLinear, the nn.Linear of the diagonal format, with DynaDiag's per-diagonal gate."""
from __future__ import annotations

import math

import torch

from ..module import SparseLayer
from .ops import diag_matmul
from .reference import check_args, diag_coords, diag_geometry, diag_to_dense


def diagonals_for_density(in_features: int, out_features: int, block_size: int, density: float) -> int:
    """K = ceil(density * R * C / D) = ceil(density * P), clamped to [1, P] (DynaDiag's rule)."""
    R, C, D, P = diag_geometry(in_features, out_features, block_size)
    return min(P, max(1, math.ceil(density * P - 1e-9)))


class DiagLinear(SparseLayer):
    """Drop-in ``nn.Linear`` whose weight is K wrap-around (block-)diagonals (DynaDiag).

    Parameters: ``values [K, D, b, b]`` (and ``bias``); buffer ``offsets [K]`` int32.
    Optional per-diagonal gate (DynaDiag's soft top-K): when ``scores`` is set (see
    ``enable_gate``), the forward uses ``values * a[k]`` with
    ``a = clamp(k_target * softmax(scores / temperature), 0, 1)``.

    Example:
        >>> layer = DiagLinear(768, 3072, density=0.1, block_size=16)
        >>> y = layer(torch.randn(4, 768))
    """
    format = "diag"
    pattern_buffers = ("offsets",)
    options = ("block_size",)


    def __init__(self, in_features: int, out_features: int, density: float | None = None, *,
                 num_diagonals: int | None = None, block_size: int = 1, bias: bool = True,
                 device=None, dtype=None, generator: torch.Generator | None = None):
        super().__init__(in_features, out_features, bias, device, dtype)
        R, C, D, P = diag_geometry(in_features, out_features, block_size)
        self.block_size = block_size
        if num_diagonals is None:
            if density is None:
                raise ValueError("give density (in (0, 1]) or num_diagonals")
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density must lie in (0, 1], got {density}")
            num_diagonals = diagonals_for_density(in_features, out_features, block_size, density)
        if not 1 <= num_diagonals <= P:
            raise ValueError(f"num_diagonals must lie in [1, P={P}], got {num_diagonals}")
        offsets = torch.randperm(P, generator=generator)[:num_diagonals].sort().values
        self.register_buffer("offsets", offsets.to(device=device, dtype=torch.int32))
        bound = 1.0 / math.sqrt(self.mean_fan_in(num_diagonals))
        values = torch.empty(num_diagonals, D, block_size, block_size, device=device, dtype=dtype)
        values.uniform_(-bound, bound, generator=generator)
        self.values = torch.nn.Parameter(values)
        self.reset_bias(bound, generator)
        self.register_parameter("scores", None)
        self.register_buffer("temperature", None)
        self.k_target = None

    def values_shape(self, offsets: torch.Tensor) -> tuple[int, ...]:
        R, C, D, P = self.geometry
        return (offsets.numel(), D, self.block_size, self.block_size)

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        return diag_geometry(self.in_features, self.out_features, self.block_size)

    def mean_fan_in(self, num_diagonals: int | None = None) -> float:
        K = self.offsets.numel() if num_diagonals is None else num_diagonals
        R, C, D, P = self.geometry
        return K * D * self.block_size / R

    @property
    def num_diagonals(self) -> int:
        return self.offsets.numel()

    def enable_gate(self, k_target: int, temperature: float, scores: torch.Tensor | None = None) -> None:
        """Turn on DynaDiag's learnable soft top-K over the stored diagonals."""
        K = self.num_diagonals
        s = torch.zeros(K, device=self.values.device, dtype=torch.float32) if scores is None else scores
        if s.shape != (K,):
            raise ValueError(f"scores must have shape [{K}], got {tuple(s.shape)}")
        if self.scores is not None and self.scores.shape == s.shape:
            with torch.no_grad():  # keep the Parameter object an optimizer may hold
                self.scores.copy_(s)
        else:
            self.scores = torch.nn.Parameter(s.detach().clone().float())
        self.temperature = torch.tensor(float(temperature), device=self.values.device)
        self.k_target = int(k_target)

    def disable_gate(self) -> None:
        self.scores = None
        self.temperature = None
        self.k_target = None

    def gate(self) -> torch.Tensor | None:
        if self.scores is None:
            return None
        a = self.k_target * torch.softmax(self.scores / self.temperature, dim=0)
        return a.clamp(0.0, 1.0)

    def effective_values(self) -> torch.Tensor:
        a = self.gate()
        if a is None:
            return self.values
        return self.values * a.to(self.values.dtype)[:, None, None, None]

    def inference_values(self) -> torch.Tensor | None:
        params = self._parameters  # (nn.Module attribute lookups cost ~0.7 us each)
        return params["values"] if params["scores"] is None else None

    def weight_blocks(self, values: torch.Tensor):
        b = self.block_size
        if b == 1:
            return super().weight_blocks(values)
        R, C, D, P = self.geometry
        brow, bcol = diag_coords(self.offsets, R, C)
        return brow.reshape(-1), bcol.reshape(-1), values.reshape(-1, b, b), b

    def forward(self, x):
        y = self.cpu_inference(x)
        if y is not None:
            return y
        # the bias is added in the kernel's epilogue (no pass over y), in y's dtype as module.bias_add
        return diag_matmul(x, self.effective_values(), self.offsets, self.block_size, self.out_features, self.bias)

    def coords(self):
        R, C, D, P = self.geometry
        b = self.block_size
        brow, bcol = diag_coords(self.offsets, R, C)  # [K, D]
        i = torch.arange(b, device=brow.device, dtype=torch.int32)
        rows = (brow[:, :, None, None] * b + i[:, None]).expand(-1, -1, b, b)
        cols = (bcol[:, :, None, None] * b + i[None, :]).expand(-1, -1, b, b)
        return rows.reshape(-1), cols.reshape(-1)

    def to_dense(self) -> torch.Tensor:
        return diag_to_dense(self.effective_values().detach(), self.offsets, self.in_features,
                             self.out_features, self.block_size)

    def set_pattern(self, values: torch.Tensor, offsets: torch.Tensor) -> None:
        """Replace the diagonals (a mask update): checks them, then swaps them in."""
        probe = self.values.new_empty(0, self.in_features)
        check_args(probe, values.to(self.values.dtype), offsets.to(torch.int32), self.block_size, self.out_features)
        self._swap_values(values.to(self.values.dtype).contiguous())
        self.offsets = offsets.to(torch.int32).contiguous()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, offsets: torch.Tensor, bias: torch.Tensor | None = None,
                   block_size: int = 1):
        """Build from a dense weight, keeping the blocks on the given diagonals."""
        out_features, in_features = weight.shape
        offsets = offsets.to(torch.int32)
        layer = cls(in_features, out_features, num_diagonals=max(1, offsets.numel()), block_size=block_size,
                    bias=bias is not None, device=weight.device, dtype=weight.dtype)
        R, C, D, P = layer.geometry
        b = block_size
        rows, cols = diag_coords(offsets, R, C)
        blocks = weight.detach().reshape(R, b, C, b).permute(0, 2, 1, 3)
        layer.set_pattern(blocks[rows.long(), cols.long()].clone(), offsets)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer
