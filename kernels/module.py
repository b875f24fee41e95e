"""What the three sparse layers share: the nn.Linear interface, the bias, the dense views used
by tests and export, and a state_dict that round-trips although shapes change with the mask."""
from __future__ import annotations

import torch
from torch import nn


class SparseLayer(nn.Module):
    """Base of FanInLinear, DiagLinear and SparseLinear (not used on its own).

    Subclasses store ``values`` (Parameter) and int32 index buffers, and implement
    ``forward``, ``coords()`` -> (rows, cols) of every stored element and ``to_dense()``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def _swap_values(self, values: torch.Tensor) -> None:
        """Give ``self.values`` new contents (and possibly a new shape) while keeping the same
        Parameter object, so optimizers and hooks holding it stay valid; the caller remaps
        optimizer state (dst.apply_update does)."""
        with torch.no_grad():
            if values.shape != self.values.shape:
                # Autograd caches a leaf's gradient accumulator with the leaf's shape; ``.data =``
                # drops that cache only on a dtype or device change, and a graph still alive
                # (the last step's loss) would then reject a gradient of the new shape.
                other = torch.float64 if self.values.dtype != torch.float64 else torch.float32
                self.values.data = torch.empty(0, dtype=other, device=self.values.device)
            self.values.data = values

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """y + bias in y's dtype: under autocast the product is bf16/fp16 and so is the sum,
        as for nn.Linear."""
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def reset_bias(self, bound: float, generator=None) -> None:
        if self.bias is not None:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound, generator=generator)

    @property
    def weight_numel(self) -> int:
        return self.out_features * self.in_features

    def nnz(self) -> int:
        return self.values.numel()

    def density(self) -> float:
        return self.nnz() / self.weight_numel

    def mask(self) -> torch.Tensor:
        """Dense boolean [out, in] mask (for tests, plots and export only)."""
        rows, cols = self.coords()
        m = torch.zeros(self.out_features, self.in_features, dtype=torch.bool, device=rows.device)
        m[rows.long(), cols.long()] = True
        return m

    def to_linear(self) -> nn.Linear:
        """A dense nn.Linear with the same function (for deployment)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.to_dense())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"density={self.density():.4f}, bias={self.bias is not None}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The pattern's shapes change with mask updates (k under ablation, K diagonals, nnz):
        # take the incoming shapes before the default copy.
        for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
            key = prefix + name
            if tensor is None or key not in state_dict:
                continue
            incoming = state_dict[key]
            if incoming.shape != tensor.shape:
                if incoming.dtype != tensor.dtype:
                    error_msgs.append(f"{key}: dtype {incoming.dtype} does not match {tensor.dtype}")
                    continue
                fresh = torch.empty(incoming.shape, dtype=tensor.dtype, device=tensor.device)
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(fresh, requires_grad=tensor.requires_grad)
                else:
                    self._buffers[name] = fresh
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
