"""Config dataclass -> --flags, with the standard library only: ``--help`` and every flag error
return before torch, triton or the kernels are imported (0.1-0.2 s instead of 5-14 s).

``parse_config(Config)`` makes one ``--snake-case`` flag per field, help from the field's
trailing comment, grouped by the section comments of the dataclass (``# data``, ``# model``,
...; a base dataclass's fields join its sections by name). A field ``dst: DSTConfig`` becomes the flags of ``dst.DSTConfig`` in a "DST" group (new
DSTConfig fields appear there by themselves), each with the methods that read it and each
method's paper default.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
import importlib.util
import inspect
import math
import re
import sys
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_dst_config():
    """dst/config.py without running dst/__init__.py, which imports the kernels (torch, triton:
    seconds). It is registered as ``sys.modules["dst.config"]``, so a later ``import dst`` takes
    this very module and every DSTConfig is one class (train/common.py binds it on the package).
    If the file cannot be loaded on its own (it grew a relative import), dst is imported."""
    if "dst.config" in sys.modules:
        return sys.modules["dst.config"]
    if "dst" not in sys.modules:
        spec = importlib.util.spec_from_file_location("dst.config", REPO / "dst" / "config.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["dst.config"] = module
        try:
            spec.loader.exec_module(module)
            return module
        except ImportError:
            del sys.modules["dst.config"]
    import dst.config
    return dst.config


_dst_config = _load_dst_config()
DSTConfig = _dst_config.DSTConfig
METHODS = _dst_config.METHODS
PAPER_DEFAULTS = _dst_config.PAPER_DEFAULTS
is_dense = _dst_config.is_dense

# Accepted values of the string flags of the entry points, checked with the flags.
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "bf16", "fp32")
GRAD_SYNCS = ("ddp", "flat")   # train/distributed.py


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing written."""


def usage_exit(message: str, prog: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def dst_methods_of(field: str) -> tuple[str, ...]:
    """The methods that read DSTConfig field ``field`` (dst.config.METHOD_SPECS)."""
    return _dst_config.methods_reading(field)


def ignored_dst_flags(method: str, given) -> list[str]:
    """The --flags among ``given`` (DSTConfig field names) that ``method`` does not read."""
    return ["--" + g.replace("_", "-") for g in given if method not in dst_methods_of(g)]


def paper_defaults_note(field: str) -> str:
    """Each method's default of ``field`` (DSTConfig.for_method), the most common value first:
    "100; gse: 1000"."""
    by_value: dict = {}
    for m in dst_methods_of(field):
        by_value.setdefault(getattr(DSTConfig.for_method(m), field), []).append(m)
    if not by_value:
        return ""
    ranked = sorted(by_value.items(), key=lambda kv: -len(kv[1]))
    first, rest = ranked[0][0], ranked[1:]
    return "; ".join([_show(first)] + [f"{', '.join(ms)}: {_show(v)}" for v, ms in rest])


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each dataclass field (and the comment-only lines after
    it), read from the source: the comments are the --help text."""
    return _read_source(cls)[0]


def field_sections(cls) -> dict[str, str]:
    """The section comment (``# data``, ``# model (...)``) above each field, "" before the first."""
    return _read_source(cls)[1]


def _read_source(cls):
    comments: dict[str, str] = {}
    sections: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            _read_class_source(klass, comments, sections)
    return comments, sections


def _read_class_source(cls, comments: dict[str, str], sections: dict[str, str]) -> None:
    names = set(inspect.get_annotations(cls))
    last, indent, section = None, 0, ""
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"(\s+)(\w+)\s*:[^#]*(?:#\s*(.*))?$", line)
        if m and m.group(2) in names:
            last, indent = m.group(2), len(m.group(1))
            comments[last] = (m.group(3) or "").strip()
            sections[last] = section
        elif last and re.match(r"\s+#", line) and len(line) - len(line.lstrip()) > indent:
            comments[last] += " " + line.strip().lstrip("#").strip()   # a continuation, indented deeper
        else:
            if re.match(r"\s+#", line):   # a section comment, at the fields' indentation
                section = line.strip().lstrip("#").strip()
            last = None


def _flag_type(hint):
    """int / float / str / bool from a field's type hint (``int | None`` -> int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": the comment says what None means
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add(group, name, hint, comment, default, dest):
    flag = "--" + name.replace("_", "-")
    comment = comment.replace("%", "%%")  # argparse %-formats help strings
    kind = _flag_type(hint)
    if kind is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=comment)
    else:
        group.add_argument(flag, dest=dest, type=kind, default=default, help=comment, metavar=kind.__name__.upper())


def _section_title(section: str) -> tuple[str, str | None]:
    """"model (None = the preset's value)" -> ("model", "None = the preset's value")."""
    m = re.match(r"([^(]+?)\s*\((.*)\)$", section)
    return (m.group(1), m.group(2)) if m else (section or "options", None)


def _add_dst_flags(parser) -> None:
    group = parser.add_argument_group(
        "DST (dst.DSTConfig)", "[methods that read the flag]; a flag left out takes the method's paper default "
        "(dst.PAPER_DEFAULTS), listed as 'default; method: value'. The sampler seed is --seed.")
    hints, comments = typing.get_type_hints(DSTConfig), field_comments(DSTConfig)
    for g in dataclasses.fields(DSTConfig):
        if g.name == "seed":
            continue
        if g.name == "method":
            _add(group, g.name, hints[g.name], f"{comments.get(g.name, '')}: {', '.join(METHODS)}", g.default,
                 "dst." + g.name)
            continue
        # default None: a flag left out is filled by DSTConfig.for_method, and a given one is known
        methods = dst_methods_of(g.name)
        where = "" if methods == METHODS else f" [{', '.join(methods)}]"
        _add(group, g.name, hints[g.name], f"{comments.get(g.name, '')}{where} (default: {paper_defaults_note(g.name)})",
             None, "dst." + g.name)


def build_parser(cls, prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of ``cls``: a group per section comment, DST flags after "optimisation"."""
    parser = _Parser(prog=prog, description=inspect.getdoc(cls), formatter_class=_Help,
                     usage=f"{prog or '%(prog)s'} [--method {{{','.join(METHODS)}}}] [--sparsity FLOAT] [flags]")
    hints, comments, sections = typing.get_type_hints(cls), field_comments(cls), field_sections(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    dst_added = False
    for f in dataclasses.fields(cls):
        if hints[f.name] is DSTConfig:
            continue
        title, description = _section_title(sections.get(f.name, ""))
        if title not in groups:
            if not dst_added and groups and "optimisation" in groups:
                _add_dst_flags(parser)
                dst_added = True
            groups[title] = parser.add_argument_group(title, description)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        _add(groups[title], f.name, hints[f.name], comments.get(f.name, ""), default, f.name)
    if not dst_added and any(hints[f.name] is DSTConfig for f in dataclasses.fields(cls)):
        _add_dst_flags(parser)
    return parser


def parse_config(cls, argv=None, prog: str | None = None):
    """Build ``cls`` (an entry point's config dataclass) from --flags; a DST flag left out takes
    the method's paper default (``DSTConfig.for_method``), and its seed is the run's. DST flags
    the method does not read are named in a warning (not an error: a table script passes one
    --delta-t to every method). Bad flags or values: one line on stderr, exit code 2."""
    parser = build_parser(cls, prog)
    hints = typing.get_type_hints(cls)
    args = vars(parser.parse_args(argv))
    values = {k: v for k, v in args.items() if not k.startswith("dst.")}
    given = {k[4:]: v for k, v in args.items() if k.startswith("dst.") and v is not None}
    method = given.pop("method")
    if method not in METHODS:
        parser.error(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    try:
        dst_cfg = DSTConfig.for_method(method, seed=values.get("seed", 0), **given)
    except ValueError as e:
        parser.error(str(e))
    dst_field = next(f.name for f in dataclasses.fields(cls) if hints[f.name] is DSTConfig)
    ignored = ignored_dst_flags(method, given)
    if ignored:
        print(f"{parser.prog}: warning: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
              f"--method {method} (ignored; --help lists the methods of each DST flag)", file=sys.stderr)
    return cls(**values, **{dst_field: dst_cfg})


def check_common(cfg) -> None:
    """Checks of the loop flags both entry points share (UsageError on the first bad one), made
    before anything heavy is imported or loaded."""
    positive = ("steps", "batch_size", "log_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup", "ckpt_every", "threads", "eval_examples", "eval_every"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.weight_decay < 0 or cfg.grad_clip < 0 or not 0 <= cfg.momentum < 1:
        raise UsageError("--weight-decay and --grad-clip must be >= 0 and --momentum in [0, 1)")
    if cfg.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"--optimizer must be {' or '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"--precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    if getattr(cfg, "grad_sync", "ddp") not in GRAD_SYNCS:
        raise UsageError(f"--grad-sync must be {' or '.join(GRAD_SYNCS)}, got {cfg.grad_sync!r}")
    if getattr(cfg, "tensorboard", False):
        from .tracking import check_tensorboard
        check_tensorboard()


class Exit(Exception):
    """Leave the trainer with ``code`` (the message, if any, is printed already)."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class TrainerFlags:
    """The flags every trainer has, with the same defaults. A trainer's config lists its own
    flags in a dataclass of its own and joins the two, its own first::

        class Config(TrainerFlags, ViTFlags): ...   # ViTFlags' fields, then these
    """
    # model (None = the preset's value)
    dim: int | None = None          # token (hidden) width (None: the preset's)
    depth: int | None = None        # transformer blocks (None: the preset's)
    heads: int | None = None        # attention heads (None: the preset's)
    mlp_dim: int | None = None      # MLP hidden width (None: the preset's)
    fused_mlp: bool = False         # each MLP as one fused kernel (kernels.fused_mlp): needs --method dynadiag,
                                    # --block-size >= 16 and --dropout 0; not yet timed on a GPU (README)
    # optimisation
    optimizer: str = "adamw"        # adamw | sgd (Nesterov)
    warmup: int = 100               # linear warm-up steps
    momentum: float = 0.9           # SGD momentum, AdamW beta1
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    # evaluation, logging, checkpoints
    eval_every: int = 0             # steps between validation passes (0: steps // 10, ten points a curve)
    log_every: int = 25             # steps between metrics.jsonl rows / progress-bar updates
    ckpt_every: int = 500           # steps between checkpoints (0 = only at the end)
    # run
    seed: int = 0                   # seeds init, data order, masking, dropout and the DST sampler
    device: str = "auto"            # auto (cuda if present) | cpu | cuda | cuda:N
    precision: str = "auto"         # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    threads: int = 0                # torch CPU threads (0 = torch's default)
    out_dir: str = ""               # run folder ("" = runs/<vit|bert>/<method>-s<sparsity>-seed<seed>)
    resume: bool = False            # continue from <out_dir>/checkpoint.pt
    overwrite: bool = False         # replace a finished run in out_dir
    accept_data_change: bool = False  # --resume on data that no longer matches the run's fingerprint (data.json:
                                      # a .txt edited, another dataset under the same name), deliberately
    plots: bool = True              # write curves.png, masks.png and churn.png
    tensorboard: bool = False       # mirror metrics.jsonl to TensorBoard in <out_dir>/tensorboard (an optional
                                    # extra: pip install -e ".[tensorboard]")
    grad_sync: str = "ddp"          # under torchrun: ddp (DistributedDataParallel, all-reduce overlapped with
                                    # backward) | flat (one all-reduce after backward); train/distributed.py
    progress: bool = True           # show a progress bar (on a terminal)
    dst: DSTConfig = field(default_factory=DSTConfig)  # --method, --sparsity, --delta-t, ... (see dst.DSTConfig)


@dataclass(frozen=True)
class Entry:
    """What a trainer tells the session about itself."""
    name: str                      # "vit": the run folder runs/<name>/..., the checkpoint's entry
    title: str                     # "ViT": plot titles
    metric: str                    # what the curves' second axis is: "accuracy"
    loss_label: str = "loss"       # the validation line: "val <loss_label> L, <metric_label> A%"
    metric_label: str = "val accuracy"

    @property
    def label(self) -> str:
        return f"train.{self.name}"

    @property
    def prog(self) -> str:
        return f"python -m {self.label}"


def entry_main(config_class, argv, entry: Entry, check_flags: typing.Callable, train: typing.Callable) -> int:
    """Parse and check every flag (standard library only), then ``train(cfg, argv)``."""
    cfg = parse_config(config_class, argv, prog=entry.prog)
    try:
        check_flags(cfg)
    except UsageError as e:
        return usage_exit(str(e), entry.prog)
    try:
        return train(cfg, argv)   # train.session.start raises Exit
    except Exit as e:
        return e.code
