"""Always-sparse dynamic sparse training: mask-update rules, schedules and layer sparsity
distributions over the sparse layers of ``kernels``.

No tensor with out * in elements is created for a sparse layer, in an update either: grow
candidates are scored by SDDMM at their coordinates or by a column-band scan of bounded
width (``dst.candidates``).

    cfg = dst.DSTConfig(method="rigl", sparsity=0.9)
    fc = dst.make_layer(cfg, 768, 3072, density=0.1)
    sparsifier = dst.Sparsifier(model, cfg, total_steps)   # then build the optimizer
"""

# This project's kernels are `alwayssparse.kernels` (kernels/_names.py: why two names); in a
# checkout that is not installed, its top-level `kernels` provides that name.
try:
    import alwayssparse.kernels  # noqa: F401
except ModuleNotFoundError:
    import kernels  # noqa: F401
from .apply import apply_mask_update, remap_parameter
from .candidates import SAMPLERS, exact_top, exact_top_per_row, sample_candidates
from .config import LAYER_FORMAT, METHODS, PAPER_DEFAULTS, DSTConfig
from .distributions import layer_densities
from .layers import layer_format, make_layer
from .rules import RULES, Rule, rule_for
from .schedules import cosine_anneal, drop_fraction, is_update_step
from .sparsifier import Sparsifier

__all__ = [
    "METHODS", "LAYER_FORMAT", "PAPER_DEFAULTS", "DSTConfig", "make_layer", "layer_densities", "layer_format",
    "Sparsifier", "RULES", "Rule", "rule_for", "SAMPLERS", "apply_mask_update", "remap_parameter",
    "exact_top", "exact_top_per_row", "sample_candidates", "drop_fraction", "cosine_anneal", "is_update_step",
]
