"""What the three sparse layers share: the nn.Linear interface, the bias, the dense views used
by tests and export, and a state_dict that round-trips although shapes change with the mask."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from . import cpu as cpu_native
from . import runtime as rt
from .coords import csr_structure, index_dtype


class _BiasAdd(torch.autograd.Function):
    """y += bias.to(y.dtype) in place (y: a product that nothing saved and no view of anything),
    whose bias gradient is dy's column sums - kernels.cpu.column_sums for a bf16 dy (fp32 sums,
    rounded to y's dtype as autograd's own sum would be), torch's otherwise."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.bias_dtype = bias.dtype
        ctx.mark_dirty(y)
        return y.add_(bias.to(y.dtype))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        db = None
        if ctx.needs_input_grad[1]:
            flat = dy.reshape(-1, dy.shape[-1])
            db = cpu_native.column_sums(flat)
            if db is None:  # (fp32, or a dy of other strides)
                db = flat.sum(0, dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32)
            db = db.to(dy.dtype).to(ctx.bias_dtype)
        return dy, db


def check_bias(bias: torch.Tensor | None, out_features: int) -> None:
    """A functional op's ``bias``: None or a float tensor [out_features]."""
    if bias is None:
        return
    rt.check_float("bias", bias)
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be [out_features] = [{out_features}], got {tuple(bias.shape)}")


def bias_add(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y + bias in y's dtype (under autocast the product is bf16 / fp16 and so is the sum, as for
    nn.Linear), y being a layer's fresh product [tokens, out]. On CPU where the bias trains and y
    is no view (the products' own output): in place, as nn.Linear's GEMM adds its bias in its
    epilogue - ``y + bias`` made a second [tokens, out] tensor a call, ~0.45 s of a 10 s ViT-B/16
    fan-in training step at batch 32 under bf16 autocast (one thread, EPYC Zen 4) - and a bf16
    y's bias gradient by the native library's column sums (torch's bf16 column sum takes 7x as
    long at 3072 columns: 46 against 6.4 ms for [6304, 3072], same CPU), as DiagLinear adds its
    bias in the kernel and sums it in its backward."""
    if bias is None:
        return y
    if (bias.requires_grad and torch.is_grad_enabled() and y.is_cpu and type(y) is torch.Tensor
            and y._base is None and y.dtype in (torch.float32, torch.bfloat16)
            and not torch.compiler.is_compiling()):
        return _BiasAdd.apply(y, bias)
    return y + bias.to(y.dtype)


def resize_parameter(param: nn.Parameter, new: torch.Tensor) -> None:
    """``param.data = new`` keeping the Parameter object (optimizers and hooks hold it), also
    when the shape changes while an old graph is still alive.

    Autograd caches a leaf's gradient accumulator with the leaf's shape, and ``.data =`` drops
    that cache only on a dtype or device change; a graph still referenced (the last step's
    loss) keeps it, and the next backward would reject a gradient of the new shape. Passing
    through an empty tensor of another dtype drops the cache.
    """
    with torch.no_grad():
        if new.shape != param.shape:
            other = torch.float32 if param.dtype == torch.float64 else torch.float64
            param.data = torch.empty(0, dtype=other, device=param.device)
        param.data = new


_NATIVE_FLOATS = (torch.float32, torch.bfloat16)


class _InferenceCache:
    """The weight copies of SparseLayer.cpu_inference, valid while the layer's parameters and
    buffers are the ones they were made from.

    Each parameter and buffer slot is watched: the object in it (``.to()``, a set_pattern, a
    state_dict load of another shape put new ones there), its version counter (bumped by
    every in-place write: an optimizer step, a state_dict load, an index edited in place) and
    its data pointer (``.data = t`` swaps the memory and keeps the counter). The tensors are
    held, so no new tensor can get a watched one's memory and with it its address. Not
    watched: writes through ``.data`` (autograd does not see them either). Not cacheable -
    ``watch`` None, rebuilt at every call - when a tensor has no version counter (made under
    inference_mode) or no memory of its own (empty: its data pointer is not unique).
    """

    def __init__(self, layer: nn.Module):
        self.layouts: dict = {}                        # (blocked, native, dtype) -> sparse / native weight
        self.matvec: cpu_native.MatVec | None = None   # the one-token native product, resolved
        self.matvec_autocast = False                   # whether it was made for a bf16 autocast region
        tensors, empty = [], []                        # (slots, name, tensor, version, address), (slots, name)
        for slots in (layer._parameters, layer._buffers):
            for name, t in slots.items():
                if t is None:
                    empty.append((slots, name))
                    continue
                if t.is_inference() or t.numel() == 0:
                    self.watch = None
                    return
                tensors.append((slots, name, t, t._version, t.data_ptr()))
        self.watch = (tuple(tensors), tuple(empty))
        self.held = tuple(t.detach() for _, _, t, _, _ in tensors)  # their memory, as it is now

    def current(self) -> bool:
        """Whether every slot holds what it held at the build (~0.2 us a slot)."""
        if self.watch is None:
            return False
        tensors, empty = self.watch
        for slots, name, t, version, ptr in tensors:
            if slots.get(name) is not t or t._version != version or t.data_ptr() != ptr:
                return False
        for slots, name in empty:
            if slots.get(name) is not None:
                return False
        return True


class SparseLayer(nn.Module):
    """Base of FanInLinear, DiagLinear and SparseLinear (not used on its own).

    Subclasses store ``values`` (Parameter) and int32 index buffers, and implement
    ``forward``, ``coords()`` -> (rows, cols) of every stored element and ``to_dense()``.
    Each names its format and its pattern (the facts dst, export and the trainers read from
    the class, so a new format is one class): a subclass with a ``format`` is registered in
    ``SparseLayer.by_format``.
    """
    format: ClassVar[str] = ""                        # the name in configs, files, tables: "fanin"
    pattern_buffers: ClassVar[tuple[str, ...]] = ()   # the index buffers, as set_pattern takes them
    options: ClassVar[tuple[str, ...]] = ()           # constructor settings beyond shape and density,
                                                      # named as the DSTConfig fields that set them
    by_format: ClassVar[dict[str, type]] = {}         # every registered format's class

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.format:
            SparseLayer.by_format[cls.format] = cls

    def values_shape(self, **pattern: torch.Tensor) -> tuple[int, ...]:
        """The shape ``values`` takes for a pattern given as set_pattern's index arguments
        (by default the first pattern buffer's shape: one value per index)."""
        return tuple(pattern[self.pattern_buffers[0]].shape)

    def pattern(self) -> dict[str, torch.Tensor]:
        """The pattern buffers by name."""
        return {b: getattr(self, b) for b in self.pattern_buffers}

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
        resize_parameter(self.values, values)

    def reset_bias(self, bound: float, generator=None) -> None:
        if self.bias is not None:
            with torch.no_grad():
                self.bias.uniform_(-bound, bound, generator=generator)


    def cpu_inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """y on CPU when no gradient is wanted, from a cached copy of the weight: in fp32 and
        bf16 the native library's product (kernels.cpu: CSR with 2-byte column indices, or for
        one token a BSR of the b x b blocks of block diagonals; bf16 weights, fp32 sums), else -
        fp64, or no C compiler - one MKL product (``addmv`` for a single token on a BSR / CSR,
        ``addmm`` on the CSR for more). A CPU autocast region in bf16 is what nn.Linear does in
        it: x, the weight and the bias rounded to bf16, y in bf16. The copy is built on first
        use and rebuilt when a parameter or buffer changes (see _InferenceCache). None where
        this path does not apply (a gradient, fp16, bf16 or autocast without the library,
        torch.compile, the Triton backend); ``forward`` then runs the custom op, whose dispatch
        and per-call CSR set-up cost as much as a batch-1 product. Speed: bench/cpu_infer.py.
        """
        # A batch-1 product takes 20-100 us. The one-token fp32 call after the first (a model's
        # decode step, online inference) checks only what can change between calls - the
        # global modes, x, the watched tensors - and calls the library with arguments resolved
        # once: 5-7 us from the module call to the library's (1.3 us of it nn.Module.__call__,
        # ~1 us the watch, 0.9 torch.empty), where the general path below took 10-14 us
        # (thread-time loops over Linear(64 -> 16), no product to speak of, 2-core EPYC).
        if torch.compiler.is_compiling() or not x.is_cpu or rt.get_backend() != "torch":
            return None
        cache = self.__dict__.get("_inference_cache")
        plan = None if cache is None else cache.matvec
        if (plan is not None and x.shape == plan.x_shape and x.dtype is plan.dtype
                and not torch.is_grad_enabled() and x.is_contiguous()
                and torch.is_autocast_enabled("cpu") is cache.matvec_autocast
                and (not cache.matvec_autocast or torch.get_autocast_dtype("cpu") is torch.bfloat16)
                and cpu_native.lib() is plan.lib and cache.current()):
            return cpu_native.matvec(plan, x)
        return self._cpu_inference(x)

    def _cpu_inference(self, x: torch.Tensor) -> torch.Tensor | None:
        """cpu_inference past its first checks: every case, and the one-token plan made."""
        params = self._parameters
        weight, bias = params["values"], params["bias"]
        autocast = torch.is_autocast_enabled("cpu")
        wants_grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        if wants_grad:
            # A training step will change the values: drop the copy instead of holding it.
            self.__dict__.pop("_inference_cache", None)
            return None
        # the dtype of the product: x's without autocast (fp32 or bf16 natively, fp64 on MKL);
        # bf16 in a bf16 autocast region for fp32 / bf16 x and weights, as nn.Linear
        if autocast:
            if (torch.get_autocast_dtype("cpu") is not torch.bfloat16 or x.dtype not in _NATIVE_FLOATS
                    or weight.dtype not in _NATIVE_FLOATS or cpu_native.lib() is None):
                self.__dict__.pop("_inference_cache", None)
                return None
            dtype = torch.bfloat16
        elif x.dtype != weight.dtype or x.dtype not in (torch.float32, torch.float64, torch.bfloat16):
            return None
        else:
            dtype = x.dtype
        if x.dim() == 0 or (dtype is torch.bfloat16 and cpu_native.lib() is None):  # (MKL has no bf16)
            return None
        values = self.inference_values()
        if values is None:
            return None
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features in its last dimension, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if autocast:  # what nn.Linear rounds to bf16 under autocast: x, the weight, the bias
            x = x.to(dtype)
            bias = None if bias is None else bias.detach().to(dtype)
        x2 = x if x.dim() == 2 else rt.flatten_tokens(x)
        if dtype in _NATIVE_FLOATS and cpu_native.lib() is not None:
            one = x2.shape[0] == 1
            # bf16 blocks of 16 | b as 16 x 16 tiles where this CPU has their kernel (AMX, else
            # AVX-512-BF16, for several tokens; AVX-512-BF16 for one), else for several tokens blocks of 8 | b
            # as a BSR (bsr_matmul's register tiles), other formats as a CSR
            b = getattr(self, "block_size", 1)
            tiles = dtype is torch.bfloat16 and b % 16 == 0 and cpu_native.block_kernel(x2.shape[0])
            several = not one and not tiles and b > 1 and cpu_native.block_products(b)
            w = self._inference_weight(values, blocked=one or tiles or several, native=True, dtype=dtype,
                                       tiles=tiles, several=several)
            if not one:
                y = cpu_native.matmul(w, x2, bias)
                return y if x.dim() == 2 else y.reshape(*lead, self.out_features)
            cache = self.__dict__["_inference_cache"]  # (made by _inference_weight)
            plan = cache.matvec
            if (plan is None or plan.weight is not w or plan.x_shape != x.shape
                    or cache.matvec_autocast is not autocast):
                plan = cpu_native.matvec_plan(w, bias, x.shape, (*lead, self.out_features))
                if cache.watch is not None:  # (else uncacheable: see _InferenceCache)
                    cache.matvec, cache.matvec_autocast = plan, autocast
            return cpu_native.matvec(plan, x if x.is_contiguous() else x.contiguous())
        if x2.shape[0] == 1:
            w = self._inference_weight(values, blocked=True)
            y = torch.mv(w, x2[0]) if self.bias is None else torch.addmv(self.bias, w, x2[0])
        else:
            w = self._inference_weight(values, blocked=False)
            xt = x2.t().contiguous()
            yt = torch.mm(w, xt) if self.bias is None else torch.addmm(self.bias[:, None], w, xt)
            y = yt.t().contiguous()
        return y.reshape(*lead, self.out_features)

    def inference_values(self) -> torch.Tensor | None:
        """The values the product uses, aligned with ``coords()``; None when they are not
        fixed tensors (DiagLinear overrides this while its gate is on). A function of the
        layer's parameters and buffers only: the cached weight is valid while they are."""
        return self._parameters["values"]

    def weight_blocks(self, values: torch.Tensor):
        """(rows, cols, blocks, b): the stored weights as b x b blocks at block coordinates,
        blocks [n, b, b] aligned with rows and cols; b = 1 for element formats (the default,
        from ``coords()``). DiagLinear with b > 1 gives its blocks, which become a BSR."""
        rows, cols = self.coords()
        return rows, cols, values.reshape(-1, 1, 1), 1

    def _inference_weight(self, values: torch.Tensor, blocked: bool, native: bool = False,
                          dtype: torch.dtype = torch.float32, tiles: bool = False, several: bool = False):
        """The weight as a sparse tensor [out, in]: BSR of ``weight_blocks`` when ``blocked``
        and b > 1, else CSR of the elements; rows sorted, columns sorted within a row, int32
        indices; with ``native`` the same structure in kernels.cpu's layout (a NativeWeight).
        Cached per layout in an _InferenceCache, rebuilt when any parameter or buffer changed
        (an optimizer step, a mask update, a state_dict load, ``.to()``); the pattern is
        checked at each build, not at each call. Each layout holds a copy of the values (a
        native one in ``dtype``: fp32 or bf16; with ``tiles`` the bf16 16 x 16 blocks of the AMX /
        AVX-512-BF16 kernels, kernels.cpu.bsr16_weight; with ``several`` a BSR for several
        tokens, whose bf16 values are kept as fp32 - each block serves a tile of tokens)."""
        cache = self.__dict__.get("_inference_cache")
        if cache is None or not cache.current():
            cache = self.__dict__["_inference_cache"] = _InferenceCache(self)
        key = (blocked, native, dtype if native else None, tiles, several)
        w = cache.layouts.get(key)
        if w is not None:
            return w
        with torch.no_grad():
            if blocked:
                rows, cols, blocks, b = self.weight_blocks(values.detach())
            else:
                (rows, cols), blocks, b = self.coords(), values.detach().reshape(-1, 1, 1), 1
            n_rows, n_cols = self.out_features // b, self.in_features // b
            rt.check_range("the layer's rows", rows, n_rows)
            rt.check_range("the layer's cols", cols, n_cols)
            order, crow, csr_cols = csr_structure(rows, cols, n_rows, n_cols,
                                                  what="the layer's pattern" if rt.checks_enabled() else None)
            idx = index_dtype(csr_cols.numel())
            blocks = blocks if order is None else blocks[order]
            size = (self.out_features, self.in_features)
            if native and b == 1:
                w = cpu_native.csr_weight(rows, cols, values.detach(), *size, panels=not blocked, dtype=dtype)
            elif native and tiles:
                w = cpu_native.bsr16_weight(crow, csr_cols, blocks, *size)
            elif native:
                w = cpu_native.bsr_weight(crow, csr_cols, blocks, *size, dtype=dtype, several=several)
            elif b == 1:
                w = torch.sparse_csr_tensor(crow.to(idx), csr_cols.to(idx), blocks.reshape(-1),
                                            size=size, check_invariants=False)
            else:
                w = torch.sparse_bsr_tensor(crow.to(idx), csr_cols.to(idx), blocks.contiguous(),
                                            size=size, check_invariants=False)
        if cache.watch is not None:
            cache.layouts[key] = w
        return w

    def __getstate__(self):
        # The weight copies are derived (and hold ctypes pointers, which neither pickle nor
        # deepcopy take): a copy of the layer makes its own.
        state = super().__getstate__()
        state.pop("_inference_cache", None)
        return state

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
