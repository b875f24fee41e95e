"""Where the kernels run, how they are launched, and the argument checks every op shares.

Backends
- CUDA tensors always run the Triton kernels.
- CPU tensors run a fast torch path by default ("torch"). Setting the backend to "triton"
  (``kernels.set_backend("triton")``, the context manager ``kernels.use_backend("triton")``
  or the environment variable ``DST_KERNELS_BACKEND=triton``) runs the same Triton kernels
  through the Triton interpreter instead: slow (about 1-2 ms per program loop iteration),
  but it executes the exact kernel code, which is what the tests do.

Triton only runs on CPU under its interpreter, and the interpreter must be switched on before
a ``@triton.jit`` function is defined: ``kernels/__init__.py`` sets ``TRITON_INTERPRET=1``
when no CUDA device is present, before any kernel module is imported. Triton's own library
functions (``tl.cdiv``, ``tl.sum``, ...) are @triton.jit functions defined when triton is
imported; when another package imported triton first, ``interpretable_triton_library``
makes those callable under the interpreter too.

Launch configs come from a per-device JSON table in ``kernels/configs/`` written by
``bench/sweep.py``; entries missing there fall back to the defaults given by each kernel.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import weakref
from functools import lru_cache
from pathlib import Path

import torch

BACKENDS = ("torch", "triton")
_backend = os.environ.get("DST_KERNELS_BACKEND", "torch")
_checks = os.environ.get("DST_KERNELS_CHECKS", "1") != "0"


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpretable_triton_library() -> int:
    """Make the @triton.jit functions of an already imported ``triton.language`` callable
    from interpreted kernels; returns how many were changed.

    ``@triton.jit`` reads TRITON_INTERPRET when a function is defined: set, it returns an
    InterpretedFunction (callable inside an interpreted kernel), unset, a JITFunction (whose
    call raises "Cannot call @triton.jit'd outside of the scope of a kernel"). So when
    ``import triton`` ran before ``import kernels`` set the variable, our kernels are
    interpreted but ``tl.cdiv``, ``tl.sum``, ``tl.rand`` (triton.language.standard / random,
    50 functions in triton 3.8) are JITFunctions. Each one found gets a subclass whose call
    runs the function through the interpreter while TRITON_INTERPRET is 1; it stays a
    JITFunction, so Triton's compiler (which inlines it from its source and never calls it)
    sees no change, and nothing is replaced in triton's modules.
    """
    if "triton" not in sys.modules:
        return 0
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    class InterpretableJITFunction(JITFunction):
        def __call__(self, *args, **kwargs):
            if not interpreting():
                return super().__call__(*args, **kwargs)
            fn = self.__dict__.get("_interpreted")
            if fn is None:
                fn = self.__dict__["_interpreted"] = InterpretedFunction(self.fn)
            return fn(*args, **kwargs)

    changed = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for value in list(vars(module).values()):
            if type(value) is JITFunction:   # exactly: subclasses (autotuners, ours) are left alone
                value.__class__ = InterpretableJITFunction
                changed += 1
    return changed


def set_backend(name: str) -> None:
    """Choose how CPU tensors are computed: "torch" (fast, default) or "triton" (interpreter)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of ``set_backend``."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def set_checks(enabled: bool) -> None:
    """Turn the data-dependent index checks (range, repeats) on or off.

    They cost a device synchronisation per call on a GPU; the layers validate indices when a
    mask changes, so benchmarks may switch the per-call checks off.
    """
    global _checks
    _checks = bool(enabled)


def checks_enabled() -> bool:
    return _checks


def runs_triton(t: torch.Tensor) -> bool:
    """Whether an op on tensor ``t`` launches the Triton kernel."""
    if t.is_cuda:
        return True
    return _backend == "triton"


CONFIG_DIR = Path(__file__).with_name("configs")


def device_key(device: torch.device | None = None) -> str:
    """File stem of the tuned-config table for a device, e.g. "nvidia_h100_80gb_hbm3"."""
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    elif device is None and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        return "interpreter"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@lru_cache(maxsize=None)
def _load_table(path: str, mtime: float) -> dict:
    with open(path) as f:
        return json.load(f)


def config_table(device: torch.device | None = None) -> dict:
    path = CONFIG_DIR / f"{device_key(device)}.json"
    if not path.exists():
        return {}
    return _load_table(str(path), path.stat().st_mtime)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, for n >= 1."""
    return 1 << max(0, int(n - 1).bit_length())


# Tuned entries are keyed on sizes rounded up to a power of two, so nearby shapes share one.
shape_bucket = next_pow2

def git_sha(short: int = 12) -> str:
    """The commit of this checkout ("-dirty" when tracked files are changed; "unknown" outside
    git): what bench results and training summaries record."""
    import subprocess
    root = Path(__file__).resolve().parents[1]

    def run(*args) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=20, cwd=root).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = run("rev-parse", f"--short={short}", "HEAD") or "unknown"
    return sha + ("-dirty" if sha != "unknown" and run("status", "--porcelain", "--untracked-files=no") else "")


@contextlib.contextmanager
def poisoned_empty():
    """Inside the block ``torch.empty`` and ``torch.empty_like`` return NaN-filled floats: a
    kernel that leaves an output element unwritten then fails its check loudly instead of
    passing on stale memory (which, with a caching allocator, may well hold a previous run's
    correct result). The kernel tests run inside it; so does every bench/sweep.py candidate."""
    originals = {name: getattr(torch, name) for name in ("empty", "empty_like")}

    def poisoning(make):
        def poisoned(*args, **kwargs):
            t = make(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(math.nan)
            return t
        return poisoned

    for name, make in originals.items():
        setattr(torch, name, poisoning(make))
    try:
        yield
    finally:
        for name, make in originals.items():
            setattr(torch, name, make)


# The functions of ``config_override`` blocks now open, innermost last.
_config_overrides: list = []


@contextlib.contextmanager
def config_override(choose):
    """Inside the block, ``launch_config(kernel, key, default, device)`` first asks
    ``choose(kernel, key, default)``: a dict is the config to launch with, None the usual
    lookup. What bench/sweep.py uses to run a candidate config (or to read the key a
    launcher looks up, by raising) through the real launcher."""
    _config_overrides.append(choose)
    try:
        yield
    finally:
        _config_overrides.remove(choose)


def launch_config(kernel: str, key: dict, default: dict, device: torch.device | None = None) -> dict:
    """The tuned launch config of ``kernel`` for ``key`` on ``device``, else ``default``.

    Table layout: {kernel: {"<k1>=<v1>,<k2>=<v2>": {config}}}; keys are sorted by name.
    Under the interpreter the defaults are used unless a table named "interpreter" exists.
    A ``config_override`` block open around the call decides first.
    """
    for choose in reversed(_config_overrides):
        chosen = choose(kernel, key, default)
        if chosen is not None:
            return chosen
    entries = config_table(device).get(kernel, {})
    found = entries.get(format_key(key))
    if found is None:
        return dict(default)
    merged = dict(default)
    merged.update(found)
    return merged


def format_key(key: dict) -> str:
    return ",".join(f"{k}={key[k]}" for k in sorted(key))


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums of ``dtype`` products accumulate in: fp64 for fp64, fp32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_index(name: str, t: torch.Tensor, ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_range(name: str, t: torch.Tensor, high: int) -> None:
    """Every entry of ``t`` in [0, high). Only when checks are on; the bounds of a tensor that
    comes back unchanged (a pattern, across steps) are read once (``index_bounds``)."""
    if not _checks or t.numel() == 0:
        return
    lo, hi = index_bounds(t)
    if lo < 0 or hi >= high:
        raise ValueError(f"{name} must lie in [0, {high}), found values in [{lo}, {hi}]")


def index_bounds(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, kept while it is unchanged (``cached_pattern``:
    its identity and version counter): a reduction and, on a GPU, a synchronisation per mask
    update instead of per call (two reductions were ~10 us of a layer's CPU call)."""
    return cached_pattern((t,), "bounds", lambda: (int(t.min()), int(t.max())))


def has_repeats(t: torch.Tensor) -> bool:
    """Whether an entry of the integer tensor ``t`` repeats along its last dimension (in a row
    of a 2-D one), kept while ``t`` is unchanged (as ``index_bounds``). False when checks are off."""
    if not _checks or t.numel() == 0 or t.shape[-1] < 2:
        return False
    return cached_pattern((t,), "repeats", lambda: bool((t.sort(dim=-1).values.diff(dim=-1) == 0).any()))


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def flatten_tokens(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [T, n] with T the product of the leading sizes (also when n or T is 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def check_dtype_match(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_libraries: dict[str, torch.library.Library] = {}


def register_autocast(qualname: str) -> None:
    """Give the custom op ``namespace::name`` torch's autocast rule for matmuls.

    Inside ``torch.autocast(device_type, dtype)`` the op's floating inputs (fp64 excepted, as
    torch does) are cast to the autocast dtype of that device type and the op runs with
    autocast off, so nothing inside it is cast again. ``torch.library.register_autocast``
    fixes one dtype at registration; this reads the dtype of the active autocast region, so
    fp16 and bf16 regions both work.
    """
    namespace, name = qualname.split("::")
    if namespace not in _libraries:
        _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type, key in _AUTOCAST_KEYS.items():
        _libraries[namespace].impl(name, _autocast_kernel(op, device_type), key)


def _autocast_args(args, device_type: str) -> tuple:
    """Autocast's rule for a matmul-like op: floating tensors (fp64 excepted, as torch does)
    cast to the dtype of the active region of ``device_type``; the rest as they are."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                 else a for a in args)


def _autocast_kernel(op, device_type: str):
    def kernel(*args):
        args = _autocast_args(args, device_type)
        with torch.autocast(device_type, enabled=False):
            return op(*args)
    return kernel


_eager = os.environ.get("DST_KERNELS_EAGER", "1") != "0"
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def set_eager(enabled: bool) -> None:
    """Whether eager calls of the ops on plain CPU tensors skip torch's dispatcher
    (``BackendOp``; on by default, ``DST_KERNELS_EAGER=0`` turns it off): the results are the
    same, only the per-call cost differs."""
    global _eager
    _eager = bool(enabled)


def _plain_eager_call(args) -> bool:
    """True for a call whose dispatch would end in the op's CPU path and its registered
    autograd and nothing else: plain CPU tensors (no subclass: fake, functional, a user's
    __torch_function__), no torch function or dispatch mode (FakeTensorMode, ``with
    torch.device(...)``), no functorch transform, not compiling and not tracing."""
    if not _eager or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS or a.device.type != "cpu"):
            return False
    return True


def _own(out, args: tuple):
    """``out``'s base where ``out`` is a view covering all of a tensor the op made (the transpose
    of a transposed product, as the CPU paths return): a custom Function's output that is a view
    may not be modified in place, and the layers add their bias to their product in place
    (module.bias_add). A view of an input stays a view."""
    base = out._base if isinstance(out, torch.Tensor) else None
    if (base is not None and base.shape == out.shape and base.stride() == out.stride()
            and base.storage_offset() == out.storage_offset() and base.dtype == out.dtype
            and not any(base is a or (isinstance(a, torch.Tensor) and base is a._base) for a in args)):
        return base
    return out


class BackendOp:
    """A custom op (``.op``, torch.library's CustomOpDef: what torch.compile, opcheck, export,
    every mode and every non-CPU tensor get) whose eager calls on plain CPU tensors go straight
    to its CPU path, under the same autocast rule and, where an input needs a gradient, an
    autograd.Function built from the same ``setup_context`` and ``backward``. The dispatcher's
    Python layers cost ~50 us a call with a gradient and ~20 us without (torch 2.13): ~0.2 ms of
    a 1.4 ms DiagLinear training step at 32 tokens (bench/cpu_train.py)."""

    def __init__(self, op, body, qualname: str):
        self.op, self._body, self._function, self.qualname = op, body, None, qualname

    def register_autograd(self, backward, *, setup_context) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        body = self._body

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = body(*args)
                setup_context(ctx, args, out)
                return tuple(_own(o, args) for o in out) if isinstance(out, tuple) else _own(out, args)

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)
        Function.__name__ = Function.__qualname__ = self.qualname.replace("::", "_") + "_eager"
        self._function = Function

    def __call__(self, *args):
        if not _plain_eager_call(args):
            return self.op(*args)
        if torch.is_autocast_enabled("cpu"):
            args = _autocast_args(args, "cpu")
            with torch.autocast("cpu", enabled=False):
                return self._call(args)
        return self._call(args)

    def _call(self, args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            if self._function is None:
                return self.op(*args)  # (no autograd registered: the op's own error / warning)
            return self._function.apply(*args)
        return self._body(*args)

    def __getattr__(self, name):
        return getattr(self.op, name)


def backend_op(qualname: str, triton, out_shape, outputs: int = 1):
    """Decorator making the decorated CPU path the custom op ``namespace::name``, with autocast
    (a ``BackendOp``: eager CPU calls skip the dispatcher).

    The op runs ``triton`` (same arguments) for tensors that take the Triton backend
    (``runs_triton`` of the first argument) and the decorated function otherwise (always
    when ``triton`` is None); its schema is the decorated function's signature. ``out_shape``
    gives the shape of each of its ``outputs`` outputs for the fake (meta) kernel: an int i
    for [the first argument's rows, args[i]], or a function of the op's arguments.

    Example:
        @rt.backend_op("ns::scale_rows", scale_rows_triton, lambda x, s: x.shape)  # or an int
        def scale_rows(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return x * s[:, None]
    """
    def define(torch_path):
        def body(*args, **kwargs):
            return (triton if runs_triton(args[0]) else torch_path)(*args, **kwargs)
        if triton is None:
            body = torch_path

        schema = torch.library.infer_schema(torch_path, mutates_args=())
        op = torch.library.custom_op(qualname, body, mutates_args=(), schema=schema)

        def fake(*args, **kwargs):
            if isinstance(out_shape, int):
                shape = (args[0].shape[0], args[out_shape])
            else:
                shape = out_shape(*args, **kwargs)
            empties = tuple(args[0].new_empty(shape) for _ in range(outputs))
            return empties[0] if outputs == 1 else empties
        op.register_fake(fake)
        register_autocast(qualname)
        return BackendOp(op, body, qualname)
    return define


def register_linear_autograd(op, dx_op, weight_grad) -> None:
    """The autograd of an op ``(x2, values, *pattern, out_features) -> x2 W^T``.

    dX = ``dx_op(dy, values, *pattern, in_features)``, dvalues = ``weight_grad(dy, x2,
    *pattern)``; the pattern tensors (a None among them is kept) and the width get no gradient.
    """
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:-1])

    def backward(ctx, dy):
        x2, values, *pattern = ctx.saved_tensors
        dy = dy.contiguous()  # a gradient from .sum() has stride 0
        dx = dx_op(dy, values, *pattern, x2.shape[1]) if ctx.needs_input_grad[0] else None
        dv = weight_grad(dy, x2, *pattern) if ctx.needs_input_grad[1] else None
        return (dx, dv) + (None,) * (len(pattern) + 1)

    op.register_autograd(backward, setup_context=setup)


_PATTERNS: dict[tuple, tuple] = {}
_PATTERNS_MAX = 1024


def cached_pattern(tensors: tuple, extra, build):
    """``build()``, cached while the same index tensors come back unchanged.

    A sparsity pattern lives across many steps (it changes at mask updates only), so the
    structure the CPU paths derive from it per call (a sort, row pointers) can be kept.
    Entries are keyed on the tensors' identity - held through weak references, so a freed
    tensor drops its entry and a new tensor at the same address cannot match - their version
    counters (an in-place change rebuilds) and ``extra`` (sizes and flags). Inference tensors
    (no version counter) and tensors seen while tracing are not cached.
    """
    if torch.compiler.is_compiling() or any(type(t) is not torch.Tensor for t in tensors):
        return build()  # tracing: fake or functional tensors, symbolic sizes - nothing to keep
    try:
        versions = tuple(t._version for t in tensors)
        key = (*(id(t) for t in tensors), extra)  # one pattern serves several structures
        hash(key)
    except (RuntimeError, TypeError):  # no version counter (inference tensors); symbolic sizes
        return build()
    hit = _PATTERNS.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)) and hit[1] == versions and hit[2] == extra:
        return hit[3]
    value = build()
    if len(_PATTERNS) >= _PATTERNS_MAX:
        _PATTERNS.pop(next(iter(_PATTERNS)))
    # (the table is bound now: at interpreter exit the module's globals may already be None)
    refs = tuple(weakref.ref(t, lambda _, key=key, table=_PATTERNS: table.pop(key, None)) for t in tensors)
    _PATTERNS[key] = (refs, versions, extra, value)
    return value
