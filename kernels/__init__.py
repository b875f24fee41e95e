"""Triton kernels, torch references, custom ops and nn layers for always-sparse training.

Formats: constant fan-in (``fanin``), wrap-around (block-)diagonal (``diag``), unstructured
coordinates (``sparse``); one SDDMM (``sddmm``) computes every weight gradient and growth score.
See ``kernels.runtime`` for how CPU tensors choose between the torch path and the Triton
interpreter.
"""
import os
import sys

from . import _names

# Installed this package is `alwayssparse.kernels`; in a checkout's root also `kernels`, the name
# of Hugging Face's hub client elsewhere: one copy under both names, the hub's API served there.
_names.bind(sys.modules[__name__])


def __getattr__(name):
    return _names.hub_attribute(__name__, name)


import torch  # noqa: E402

# Triton runs on CPU only under its interpreter, which must be on before any @triton.jit
# function is defined (see ENVIRONMENT notes in the README).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import runtime  # noqa: E402

if runtime.interpreting():
    # triton imported before this package defined triton.language's functions uninterpreted.
    runtime.interpretable_triton_library()
from .runtime import set_backend, get_backend, use_backend, set_checks  # noqa: E402
from .sddmm import sddmm, sddmm_ref, sddmm_fwd, sddmm_kernel, sddmm_block_kernel  # noqa: E402
from .fanin import (FanInLinear, fanin_matmul, fanin_matmul_ref, fanin_fwd, fanin_dx,  # noqa: E402
                    fanout_structure, fanin_fwd_kernel, fanin_dx_kernel)
from .sparse import csr_matmul  # noqa: E402

# The raw @triton.jit kernels, for other Triton projects: each docstring gives its grid and the
# shape, dtype and constraint of every argument; the launchers (fanin_fwd, fanin_dx, sddmm_fwd,
# diag_fwd, diag_dx, diag_dw, fused_diag_mlp_fwd) show a complete launch. README: "Launching a
# raw kernel".
RAW_KERNELS = ("fanin_fwd_kernel", "fanin_dx_kernel", "sddmm_kernel", "sddmm_block_kernel",
               "diag_block_kernel", "diag_elem_kernel", "diag_dw_kernel", "diag_dw_band_kernel",
               "fused_diag_mlp_kernel")
__all__ = [
    "runtime", "set_backend", "get_backend", "use_backend", "set_checks",
    "sddmm", "sddmm_ref", "sddmm_fwd", "sddmm_kernel", "sddmm_block_kernel",
    "FanInLinear", "fanin_matmul", "fanin_matmul_ref", "fanin_fwd", "fanin_dx", "fanout_structure",
    "fanin_fwd_kernel", "fanin_dx_kernel", "csr_matmul",
]
from .diag import (DiagLinear, diag_matmul, diag_matmul_ref, diag_fwd, diag_dx,  # noqa: E402
                   diag_coords, diag_geometry, diag_block_kernel, diag_elem_kernel, diag_dw_kernel,
                   diag_dw_band_kernel)

__all__ += ["DiagLinear", "diag_matmul", "diag_matmul_ref", "diag_fwd", "diag_dx", "diag_coords",
            "diag_geometry", "diag_block_kernel", "diag_elem_kernel", "diag_dw_kernel", "diag_dw_band_kernel"]
from .sparse import SparseLinear, sparse_matmul, sparse_matmul_ref  # noqa: E402
from .module import SparseLayer, resize_parameter  # noqa: E402
from . import coords  # noqa: E402

__all__ += ["SparseLinear", "sparse_matmul", "sparse_matmul_ref", "SparseLayer", "resize_parameter", "coords"]
from .export import save_condensed, load_layers, load_into, densify, sparse_from_dense, atomic_write  # noqa: E402

__all__ += ["save_condensed", "load_layers", "load_into", "densify", "sparse_from_dense", "atomic_write"]
from .fused import fused_diag_mlp, fused_mlp, fused_diag_mlp_fwd, fused_diag_mlp_kernel  # noqa: E402

__all__ += ["fused_diag_mlp", "fused_mlp", "fused_diag_mlp_fwd", "fused_diag_mlp_kernel"]

# Triton's interpreter wraps a kernel in an object without the function's docstring: give it
# back, so that help(kernels.sddmm_kernel) reads the same on CPU as on a GPU.
for _kernel in list(globals().values()):
    if getattr(_kernel, "__doc__", "") is None and getattr(getattr(_kernel, "fn", None), "__doc__", None):
        try:
            _kernel.__doc__ = _kernel.fn.__doc__
        except (AttributeError, TypeError):
            pass
del _kernel
