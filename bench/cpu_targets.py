"""Issue 23's CPU targets, judged from the files one `bash bench/cpu_check.sh` run wrote: every
target's figure, its anchor, the threshold for this CPU's class and met / missed / not measured.

    python bench/cpu_targets.py bench/results/cpu_check/<cpu>_<build>   # prints, writes cpu_targets.md
    python bench/cpu_targets.py DIR --strict                            # exit 1 when a target is missed

The CPU's class comes from the flags line of DIR/cpu_check.log (phase 1), or --flags:
    amx          amx_bf16 present: the issue's Xeon column (dense bf16 is oneDNN on AMX tiles)
    avx512_bf16  avx512_bf16 without AMX (Zen 4, Cooper Lake): the Xeon column, against this
                 CPU's own dense bf16 (oneDNN with VDPBF16PS)
    avx2         neither: the AVX2-only column (dense bf16 has no bf16 instructions there, so the
                 block targets are against dense fp32)
Figures are the ratios the benches measured side by side in one run (never recomputed from times
of different runs): bench/cpu_infer.py's x_dense (vs dense bf16) and x_dense_fp32 columns of
cpu_infer_bf16_batch{1,32,256}.csv (the last run in each file), bench/e2e.py's x_dense_train /
x_dense_infer of e2e_{infer,train,bert}.csv (or, for folders written before those were kept,
the tables of e2e_{infer,train}.md). The issue's rows and thresholds: TARGETS below.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

CLASSES = ("amx", "avx512_bf16", "avx2")
FLAGS = {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
# cpu_infer.py's variant names of the layers the issue names (bf16 rows)
B16, FANIN = "diagonal b=16 bf16", "fan-in (condensed) bf16"
DENSE_BF16 = "dense nn.Linear bf16"

# (figure, anchor, source, key, {class: threshold or None (report only)}).
# source "infer": (batch, variant or "*" for the worst bf16 sparse layer, column);
# source "e2e": (model, column) over the sparse formats of the folder's e2e runs.
_XEON = {"amx": None, "avx512_bf16": None}  # report only on the Xeon column
TARGETS = [
    ("DiagLinear b=16, 32 tokens", "dense bf16", "infer", (32, B16, "x_dense"), {"amx": 4.0, "avx512_bf16": 4.0}),
    ("DiagLinear b=16, 256 tokens", "dense bf16", "infer", (256, B16, "x_dense"), {"amx": 3.0, "avx512_bf16": 3.0}),
    ("DiagLinear b=16, 32 tokens", "dense fp32", "infer", (32, B16, "x_dense_fp32"), {**_XEON, "avx2": 3.0}),
    ("DiagLinear b=16, 256 tokens", "dense fp32", "infer", (256, B16, "x_dense_fp32"), {**_XEON, "avx2": 3.0}),
    ("FanInLinear, 32 tokens", "dense bf16", "infer", (32, FANIN, "x_dense"), {"amx": 2.5, "avx512_bf16": 2.5}),
    ("FanInLinear, 256 tokens", "dense bf16", "infer", (256, FANIN, "x_dense"), {"amx": 2.0, "avx512_bf16": 2.0}),
    ("every format, 1 token (the slowest)", "dense bf16", "infer", (1, "*", "x_dense"),
     {"amx": 5.0, "avx512_bf16": 5.0, "avx2": 5.0}),
    ("ViT-B/16 inference, batch 32, bf16 autocast", "the dense model under autocast", "e2e",
     ("vit-b16", "x_dense_infer"), {"amx": 2.0, "avx512_bf16": 2.0, "avx2": None}),
    ("ViT-B/16 training step, batch 32, bf16 autocast", "the dense model under autocast", "e2e",
     ("vit-b16", "x_dense_train"), {"amx": 1.5, "avx512_bf16": 1.5, "avx2": None}),
    ("BERT-base inference, bf16 autocast", "the dense model under autocast", "e2e",
     ("bert-base", "x_dense_infer"), {c: None for c in CLASSES}),
    ("BERT-base training step, bf16 autocast", "the dense model under autocast", "e2e",
     ("bert-base", "x_dense_train"), {c: None for c in CLASSES}),
]


def cpu_class(flags: set[str]) -> str:
    """The issue's column for a CPU with these /proc/cpuinfo flags."""
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else "avx2"


def logged_flags(log: Path) -> set[str] | None:
    """The flags line cpu_check.sh's phase 1 writes (only flag names on it), None if absent."""
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        words = set(line.split())
        if words and words <= FLAGS:
            return words
    return None


def _last_run(path: Path) -> list[dict]:
    """The rows of the last run in a CSV the benches append to (their "run" column)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r.get("run") == rows[-1].get("run")] if rows else []


def _number(v) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x else None


def infer_figure(folder: Path, batch: int, variant: str, column: str) -> tuple[float | None, str]:
    """(ratio, what it is) from cpu_infer_bf16_batch<batch>.csv; variant "*": the smallest over
    the bf16 sparse layers."""
    rows = _last_run(folder / f"cpu_infer_bf16_batch{batch}.csv")
    if variant != "*":
        hits = [_number(r.get(column)) for r in rows if r.get("variant") == variant]
        hits = [h for h in hits if h is not None]
        return (hits[-1], variant) if hits else (None, f"no {variant!r} row")
    sparse = [(_number(r.get(column)), r["variant"]) for r in rows
              if r.get("variant", "").endswith(" bf16") and r.get("variant") != DENSE_BF16]
    sparse = [s for s in sparse if s[0] is not None]
    return min(sparse) if sparse else (None, "no bf16 sparse rows")


def _md_e2e_rows(path: Path) -> list[dict]:
    """e2e.md's table as rows: its two "x dense" columns are the training step's (after "train
    ms") and inference's (after "infer ms")."""
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return []
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    names = []
    for i, c in enumerate(head):
        if c == "x dense" and i > 0 and head[i - 1] in ("train ms", "infer ms"):
            names.append("x_dense_train" if head[i - 1] == "train ms" else "x_dense_infer")
        else:
            names.append(c)
    return [dict(zip(names, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def e2e_rows(folder: Path) -> dict[str, list[dict]]:
    """The rows of the folder's e2e runs by run: "infer" (ViT-B/16, inference only), "train" (its
    training step, and inference again), "bert" (BERT-base, both)."""
    return {kind: _last_run(folder / f"e2e_{kind}.csv") or _md_e2e_rows(folder / f"e2e_{kind}.md")
            for kind in ("infer", "train", "bert")}


def e2e_figure(runs: dict[str, list[dict]], model: str, column: str) -> tuple[float | None, str]:
    """The best sparse format's ratio for the model, every format's figure named, from the first
    run that has it (inference: the inference-only run before the training run's)."""
    for kind in ("infer", "train", "bert") if column == "x_dense_infer" else ("train", "bert"):
        got = [(_number(r.get(column)), r.get("format", "?")) for r in runs[kind]
               if r.get("model") == model and r.get("format") not in (None, "dense")
               and r.get("status", "ok") == "ok"]
        got = [g for g in got if g[0] is not None]
        if got:
            best = max(got)
            named = ", ".join(f"{f} {x:.2f}x" for x, f in sorted(got, key=lambda g: g[1]))
            return best[0], f"{best[1]} (e2e_{kind}: {named})"
    return None, f"no {model} rows"


def judge(folder: Path, klass: str) -> list[dict]:
    e2e = e2e_rows(folder)
    out = []
    for figure, anchor, source, key, thresholds in TARGETS:
        if klass not in thresholds:
            continue
        x, what = infer_figure(folder, *key) if source == "infer" else e2e_figure(e2e, *key)
        t = thresholds[klass]
        verdict = ("not measured" if x is None else "report" if t is None
                   else "met" if x >= t else f"missed by {t / x:.2f}x")
        out.append({"figure": figure, "anchor": anchor, "target": "-" if t is None else f">= {t:g}x",
                    "measured": "-" if x is None else f"{x:.2f}x", "of": what, "verdict": verdict})
    return out


def report(folder: Path, klass: str, rows: list[dict]) -> str:
    lines = [f"# Issue 23's CPU targets: {folder}", "",
             f"CPU class: **{klass}** ({'from ' + str(folder / 'cpu_check.log') if (folder / 'cpu_check.log').exists() else 'from --flags'}); "
             "every ratio measured side by side in one run by the bench that wrote it (bench/cpu_targets.py).", "",
             "| figure | anchor | target | measured | of | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['figure']} | {r['anchor']} | {r['target']} | {r['measured']} | {r['of']} | {r['verdict']} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="a folder bench/cpu_check.sh wrote")
    p.add_argument("--flags", default=None,
                   help="the CPU's flags, space separated (default: cpu_check.log's flags line)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target with a threshold is missed")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        p.error(f"folder: {args.folder} is not a directory (expected one bench/cpu_check.sh wrote)")
    flags = set(args.flags.split()) if args.flags is not None else logged_flags(args.folder / "cpu_check.log")
    if flags is None:
        p.error(f"--flags: {args.folder / 'cpu_check.log'} has no flags line; name the CPU's flags "
                f"(of {sorted(FLAGS)})")
    unknown = flags - FLAGS
    if unknown:
        p.error(f"--flags: unknown flag(s) {sorted(unknown)}; expected some of {sorted(FLAGS)}")
    klass = cpu_class(flags)
    rows = judge(args.folder, klass)
    text = report(args.folder, klass, rows)
    (args.folder / "cpu_targets.md").write_text(text)
    sys.stdout.write(text)
    return 1 if args.strict and any(r["verdict"].startswith("missed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
