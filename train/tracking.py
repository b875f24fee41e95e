"""Experiment tracking beside metrics.jsonl, which stays the source of truth: ``--tensorboard``
mirrors every row a run writes there into TensorBoard event files in <run dir>/tensorboard,
through torch.utils.tensorboard (the tensorboard package is an optional extra; nothing is
downloaded at run time):

    pip install -e ".[tensorboard]"
    python -m train.vit --method rigl --tensorboard
    tensorboard --logdir runs/vit

A row ``{"step": s, "split": S, k: v, ...}`` becomes the scalar ``S/k`` at step s for every
number v; nested dicts extend the tag (a "mask" row's ``layers`` -> ``mask/layers/<layer>/grown``) and
lists of numbers become histograms (a "gates" row's ``gates/layers/<layer>/scores``). Strings and the
diagonal offsets (indices, not values) are left to the JSONL. A resumed run purges the events
at and after its checkpoint's step, as its metrics.jsonl drops those rows, so no step appears
twice. Only rank 0 mirrors under torchrun.
"""
from __future__ import annotations

from pathlib import Path

from .flags import UsageError

INSTALL = 'pip install -e ".[tensorboard]"  (or: pip install "tensorboard>=2.21,<3")'
SKIPPED_KEYS = frozenset({"step", "split", "offsets"})


def check_tensorboard() -> None:
    """UsageError naming --tensorboard and the install command unless the tensorboard package
    (and the protobuf its event files need) imports; called with the other flag checks, before
    any data or model loads."""
    try:
        import tensorboard  # noqa: F401
        from tensorboard.compat.proto import event_pb2  # noqa: F401  (protobuf: what the writer needs)
    except ImportError as e:
        raise UsageError(f"--tensorboard needs the tensorboard package, which is not installed here ({e}); "
                         f"install it with: {INSTALL}") from None


def flatten(row: dict, prefix: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """(scalars, histograms) of one JSONL row under ``prefix``: numbers (bools as 0 / 1) by tag,
    lists of numbers by tag; ``step``, ``split``, ``offsets`` and strings are skipped."""
    scalars: dict[str, float] = {}
    histograms: dict[str, list[float]] = {}
    for key, value in row.items():
        if key in SKIPPED_KEYS:
            continue
        tag = f"{prefix}/{key}"
        if isinstance(value, bool) or isinstance(value, (int, float)):
            scalars[tag] = float(value)
        elif isinstance(value, dict):
            s, h = flatten(value, tag)
            scalars.update(s)
            histograms.update(h)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
            histograms[tag] = [float(v) for v in value]
    return scalars, histograms


class TensorBoardMirror:
    """train.common.Metrics that also writes each row to a torch.utils.tensorboard
    SummaryWriter: same ``write(**row)`` / ``close()``; the JSONL is written first."""

    def __init__(self, metrics, log_dir: Path, purge_step: int = 0):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.metrics = metrics
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step or None)

    def write(self, **row) -> None:
        self.metrics.write(**row)
        step = int(row["step"])
        scalars, histograms = flatten(row, str(row.get("split", "log")))
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, values in histograms.items():
            import numpy as np
            self.writer.add_histogram(tag, np.asarray(values, dtype=np.float64), step)
        self.writer.flush()

    def close(self) -> None:
        self.metrics.close()
        self.writer.close()


def mirror(metrics, run_dir: Path, enabled: bool, start_step: int = 0):
    """``metrics`` itself, or a TensorBoardMirror of it into ``run_dir``/tensorboard when
    ``enabled`` (--tensorboard on rank 0); ``start_step``: the resumed checkpoint's step."""
    return TensorBoardMirror(metrics, Path(run_dir) / "tensorboard", start_step) if enabled else metrics
