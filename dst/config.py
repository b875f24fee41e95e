"""The DST methods (the layer format each builds, the settings it reads, its paper's values) and
the one config every entry point turns into --flags. Standard library only."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DISTRIBUTIONS = ("uniform", "erk", "er")
DROP_SCHEDULES = ("cosine", "constant", "linear")
GROW_MODES = ("exact", "uniform", "grabo", "graest")
SCOPES = ("layer", "global")
FREEZE_GATES = ("fold", "ones")


@dataclass(frozen=True)
class Method:
    """What the flags and the layer builder need to know of a method, with the standard library
    only (train/flags.py reads it before torch loads); its behaviour is its Rule (dst/rules.py)."""
    layer: str                     # the layer it builds: "dense" -> nn.Linear, "sparse" -> kernels.SparseLinear,
                                   # "fanin" -> kernels.FanInLinear, "diag" -> kernels.DiagLinear
    reads: tuple[str, ...] = ()    # the DSTConfig fields of its own (method, sparsity, distribution and seed
                                   # are everyone's)
    paper: dict = dataclasses.field(default_factory=dict)   # its paper's settings (DESIGN.md section 5); the
                                                            # DSTConfig defaults are RigL's


_UPDATES = ("delta_t", "alpha", "drop_schedule")
_UNTIL_T_END = _UPDATES + ("t_end",)
_GRADIENT_GROWTH = ("grow", "gamma")
METHOD_SPECS = {
    "dense": Method("dense"),
    "static": Method("sparse", paper={"distribution": "erk"}),
    "set": Method("sparse", _UNTIL_T_END, {"alpha": 0.3, "drop_schedule": "constant"}),
    "rigl": Method("sparse", _UNTIL_T_END + _GRADIENT_GROWTH + ("scope",),
                   {"delta_t": 100, "alpha": 0.3, "t_end": 0.75, "drop_schedule": "cosine", "distribution": "erk"}),
    "srigl": Method("fanin", _UNTIL_T_END + _GRADIENT_GROWTH + ("gamma_sal", "ablation"),
                    {"delta_t": 100, "alpha": 0.3, "t_end": 0.75, "drop_schedule": "cosine", "gamma_sal": 0.95,
                     "ablation": True}),
    # DynaDiag stops updating at its freeze (freeze_at), not at t_end.
    "dynadiag": Method("diag", _UPDATES + _GRADIENT_GROWTH + ("block_size", "temp_start", "temp_end", "freeze_at",
                                                               "freeze_gate", "candidates"),
                       {"temp_start": 5.0, "temp_end": 0.05, "freeze_at": 0.3}),
    "gse": Method("sparse", _UNTIL_T_END + _GRADIENT_GROWTH + ("scope",),
                  {"delta_t": 1000, "alpha": 0.2, "drop_schedule": "cosine", "distribution": "er", "grow": "uniform",
                   "gamma": 1.0}),
}
METHODS = tuple(METHOD_SPECS)
LAYER_FORMAT = {m: spec.layer for m, spec in METHOD_SPECS.items()}
PAPER_DEFAULTS = {m: spec.paper for m, spec in METHOD_SPECS.items()}


def methods_reading(field: str) -> tuple[str, ...]:
    """The methods that read DSTConfig field ``field`` (every method for a field no method
    claims as its own: method, sparsity, distribution, seed)."""
    own = tuple(m for m, spec in METHOD_SPECS.items() if field in spec.reads)
    return own or METHODS


def is_dense(method: str) -> bool:
    """Whether ``method`` trains dense nn.Linear layers (no sparse layer, no mask)."""
    return METHOD_SPECS[method].layer == "dense"


def check_choice(field: str, value, choices) -> None:
    """ValueError naming the field and listing the choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_range(field: str, value, low, high, low_open=False, high_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{field} must lie in {lo}{low}, {'inf' if high is None else high}{hi}, got {value!r}")


def _check_int(field: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{field} must be an int >= {low}, got {value!r}")


@dataclass
class DSTConfig:
    method: str = "rigl"              # one of METHODS
    sparsity: float = 0.9             # overall fraction of zero weights in the sparse layers, in [0, 1)
    distribution: str = "uniform"     # per-layer sparsity: uniform | erk (RigL) | er (GSE)
    delta_t: int = 100                # steps between mask updates
    alpha: float = 0.3                # initial drop fraction (of each layer's nnz)
    t_end: float = 0.75               # stop updating masks at this fraction of training
    drop_schedule: str = "cosine"     # drop fraction over time: cosine | constant | linear
    grow: str = "exact"               # gradient grow candidates: exact (chunked scan of all inactive
                                      # weights; dynadiag: of all diagonals not stored) | uniform | grabo |
                                      # graest (GSE's samplers; gse runs one of these)
    gamma: float = 1.0                # sampled candidates per update = gamma * |active| (GSE's |S| = gamma|A|),
                                      # never fewer than the number to grow
    scope: str = "layer"              # rigl / gse: rank grow candidates per layer or over all layers at once
    gamma_sal: float = 0.95           # SRigL salience threshold in [0, 1] (0.3 for CNNs, 0.95 for ViT)
    ablation: bool = True             # SRigL neuron ablation
    block_size: int = 1               # DynaDiag block size b (b x b blocks; b >= 16 uses tensor cores)
    temp_start: float = 5.0           # DynaDiag gate temperature at step 0 (cosine anneal)
    temp_end: float = 0.05            # DynaDiag gate temperature at the freeze step
    freeze_at: float = 0.3            # DynaDiag: freeze the top-K diagonals at this fraction of training
    freeze_gate: str = "ones"         # DynaDiag at the freeze: ones (the top-K gates set to 1, as the authors;
                                      # +0.3 points over fold on both ViT tables) | fold (values *= gate:
                                      # the function stays, the frozen diagonals start small)
    candidates: float = 1.0           # DynaDiag: candidate diagonals carried beside the K active, as a
                                      # multiple of K (bounded by P - K)
    seed: int = 0                     # seed of the sampler RNG (mask updates)

    @classmethod
    def for_method(cls, method: str, **overrides) -> "DSTConfig":
        """The config with ``method``'s paper defaults, then ``overrides`` on top."""
        check_choice("method", method, METHODS)
        return cls(method=method, **{**PAPER_DEFAULTS[method], **overrides}).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "DSTConfig":
        """Raise ValueError naming the first bad field (with its choices or range); return self."""
        check_choice("method", self.method, METHODS)
        _check_range("sparsity", self.sparsity, 0.0, 1.0, high_open=True)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_int("delta_t", self.delta_t, 1)
        _check_range("alpha", self.alpha, 0.0, 1.0)
        _check_range("t_end", self.t_end, 0.0, 1.0, low_open=True)
        check_choice("drop_schedule", self.drop_schedule, DROP_SCHEDULES)
        check_choice("grow", self.grow, GROW_MODES)
        _check_range("gamma", self.gamma, 0.0, None, low_open=True)
        check_choice("scope", self.scope, SCOPES)
        _check_range("gamma_sal", self.gamma_sal, 0.0, 1.0)
        if not isinstance(self.ablation, bool):
            raise ValueError(f"ablation must be a bool, got {self.ablation!r}")
        _check_int("block_size", self.block_size, 1)
        _check_range("temp_start", self.temp_start, 0.0, None, low_open=True)
        _check_range("temp_end", self.temp_end, 0.0, None, low_open=True)
        if self.temp_end > self.temp_start:
            raise ValueError(f"temp_end ({self.temp_end}) must not exceed temp_start ({self.temp_start}): "
                             "the temperature anneals downwards")
        _check_range("freeze_at", self.freeze_at, 0.0, 1.0)
        check_choice("freeze_gate", self.freeze_gate, FREEZE_GATES)
        _check_range("candidates", self.candidates, 0.0, None)
        _check_int("seed", self.seed, 0)
        return self
