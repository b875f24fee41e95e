"""What the benchmarks share: the environment header, the timers, the correctness gate, and
the tuned launch-config tables that ``kernels.runtime.launch_config`` reads.

Timing: on a GPU ``triton.testing.do_bench`` medians (L2 flushed between runs); on CPU a
median of ``perf_counter`` runs. Triton kernels on CPU run under the interpreter, so their
CPU times measure numpy emulation, not the kernel: every output made there says so.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kernels import atomic_write
from kernels import runtime as rt

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INTERPRETER_NOTE = ("Triton ran under the CPU interpreter (TRITON_INTERPRET=1): kernel timings "
                    "measure numpy emulation and are NOT speed figures; only the pipeline is exercised.")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def interpreting() -> bool:
    return rt.interpreting()


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


git_sha = rt.git_sha


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header() -> dict:
    """GPU, driver, torch, triton, git sha and the timing mode of this process."""
    import triton

    h = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "git": git_sha(), "python": platform.python_version(), "torch": torch.__version__,
         "triton": triton.__version__, "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(),
         "table": rt.device_key()}
    if hasattr(os, "getloadavg"):
        h["load_avg_1min"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        h["gpu"] = torch.cuda.get_device_name()
        h["cuda"] = torch.version.cuda or "n/a"
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        h["driver"] = smi[0] if smi else "n/a"
        h["timing"] = "triton.testing.do_bench median (ms), L2 flushed between runs"
    else:
        h["gpu"] = "none"
        h["driver"] = "n/a"
        h["timing"] = "perf_counter median (ms) on CPU"
        if interpreting():
            h["note"] = INTERPRETER_NOTE
    return h


def header_markdown(h: dict) -> str:
    lines = [f"- **{k}**: {v}" for k, v in h.items() if k != "note"]
    if "note" in h:
        lines.append(f"\n> **{h['note']}**")
    return "\n".join(lines)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_ms(fn, *, warmup_ms: float = 25.0, rep_ms: float = 100.0, cpu_reps: int = 5) -> float:
    """Median time of ``fn()`` in milliseconds.

    GPU: ``triton.testing.do_bench(return_mode="median")``. CPU: one warm-up call, then the
    median of ``cpu_reps`` timed calls.
    """
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# Error allowed on top of 2x torch's own error at the same dtype (flash-attention's rule, the
# same as tests/kernels/conftest.py), scaled by the largest reference magnitude.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def gate(out: torch.Tensor, truth: torch.Tensor, lowp: torch.Tensor | None) -> tuple[bool, float, float, str]:
    """(passed, error, bound, reason) of a kernel output against the fp64 ``truth``.

    fp16/bf16: max error <= 2 x (error of torch's own product at that dtype, ``lowp``) + atol;
    fp32: atol plus a sqrt(n) rounding allowance. NaN or a wrong shape fails outright.
    """
    if not isinstance(out, torch.Tensor):
        return False, math.inf, 0.0, f"returned {type(out).__name__}, not a tensor"
    if out.shape != truth.shape:
        return False, math.inf, 0.0, f"shape {tuple(out.shape)} != {tuple(truth.shape)}"
    if out.numel() == 0:
        return True, 0.0, 0.0, ""
    if not bool(torch.isfinite(out).all()):
        return False, math.inf, 0.0, "non-finite output (an unwritten element?)"
    scale = max(1.0, truth.abs().max().item())
    err = (out.double() - truth).abs().max().item()
    atol = ATOL[out.dtype] * scale
    if lowp is None or out.dtype in (torch.float32, torch.float64):
        bound = atol
        if out.dtype == torch.float32:
            bound += 4 * scale * 2 ** -23 * math.sqrt(truth.numel())
    else:
        bound = 2 * (lowp.double() - truth).abs().max().item() + atol
    if err > bound:
        return False, err, bound, f"max error {err:.3e} > allowed {bound:.3e}"
    return True, err, bound, ""


poisoned_empty = rt.poisoned_empty   # NaN-filled fresh outputs (the kernel tests use it too)


class _Probed(Exception):
    pass


def probe_launch(fn) -> list[tuple[str, dict, dict]]:
    """The (kernel, key, default) of every ``launch_config`` lookup ``fn`` makes, read from
    the launcher itself (so the bench never re-derives a kernel's key). The launch is cut
    short at the first lookup: nothing runs."""
    calls = []

    def record(kernel, key, default):
        calls.append((kernel, dict(key), dict(default)))
        raise _Probed

    with contextlib.suppress(_Probed), rt.config_override(record):
        fn()
    return calls


@contextlib.contextmanager
def forced_config(kernel: str, config: dict):
    """Every lookup of ``kernel`` returns ``default`` updated with ``config`` - exactly how
    ``launch_config`` merges a table entry - so a candidate runs through the real launcher."""
    def forced(name, key, default):
        return {**default, **config} if name == kernel else None

    with rt.config_override(forced):
        yield


@contextlib.contextmanager
def table_dir(path: Path | str | None):
    """Point ``kernels.runtime.CONFIG_DIR`` at ``path`` (None: leave it)."""
    if path is None:
        yield
        return
    original = rt.CONFIG_DIR
    rt.CONFIG_DIR = Path(path)
    try:
        yield
    finally:
        rt.CONFIG_DIR = original


def table_path(directory: Path | str, key: str | None = None) -> Path:
    return Path(directory) / f"{key or rt.device_key()}.json"


def read_table(path: Path | str) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def merge_table(path: Path | str, winners: dict[str, dict[str, dict]], meta: dict) -> dict:
    """Write ``winners`` {kernel: {key: config}} into the table at ``path``, keeping every
    entry the sweep did not touch; ``_meta`` records who wrote it. Returns the new table."""
    path = Path(path)
    table = read_table(path)
    for kernel, entries in winners.items():
        table.setdefault(kernel, {}).update({k: dict(v) for k, v in entries.items()})
    table["_meta"] = dict(meta)
    ordered = {k: (dict(sorted(v.items())) if k != "_meta" else v) for k, v in sorted(table.items())}
    text = json.dumps(ordered, indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return ordered


def append_csv(path: Path, rows: list[dict], fields: list[str], mode: str = "a") -> None:
    """Append rows (the header is written once, when the file is new); ``mode="w"``: the
    file is written anew (``write_csv``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = mode == "w" or not path.exists()
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: cell(r.get(k)) for k in fields})


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    """The rows as a new CSV file (header first)."""
    append_csv(path, rows, fields, mode="w")


def cell(v):
    """How a value is written into a CSV cell."""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


def fmt(v, digits: int = 3) -> str:
    """A table cell: floats (also as read back from a CSV) to ``digits`` significant digits."""
    if isinstance(v, str) and v.lower() == "nan":
        return "-"
    if isinstance(v, str) and any(ch in v for ch in ".e"):
        try:
            v = float(v)
        except ValueError:
            return v
    if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Markdown table; ``columns`` is [(field, title)]."""
    out = ["| " + " | ".join(t for _, t in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(f)) for f, _ in columns) + " |")
    return "\n".join(out)


def geomean(xs) -> float:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else math.nan


DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]

