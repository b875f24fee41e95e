"""Collect the summary.json files of finished runs into a markdown table: mean and spread over
seeds per (entry point, method, sparsity).

    python -m train.table runs/vit runs/bert runs/gpt                  # print the table
    python -m train.table runs/vit --json train/results/vit.json --markdown train/results/vit.md
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dst import METHODS, DSTConfig

from .flags import dst_methods_of, is_dense

METRICS = {"vit": [("test accuracy %", lambda s: 100 * s["test"]["accuracy"])],
           "bert": [("test MLM loss", lambda s: s["test"]["mlm_loss"]),
                    ("test masked acc. %", lambda s: 100 * s["test"]["mlm_accuracy"])],
           "gpt": [("test perplexity", lambda s: s["test"]["perplexity"]),
                   ("test LM loss", lambda s: s["test"]["lm_loss"]),
                   ("next-token acc. %", lambda s: 100 * s["test"]["accuracy"])]}


def _changed(summary: dict) -> set[str]:
    """DST settings of a run that differ from its method's paper defaults, as "name=value"."""
    dst = summary["config"]["dst"]
    paper = DSTConfig.for_method(dst["method"]).to_dict()
    # Only settings the method reads: a field added later (its default recorded in old runs) or
    # another method's setting does not split a method's rows.
    return {f"{k}={dst[k]}" for k in dst if k not in ("seed", "sparsity", "method") and k in paper
            and dst["method"] in dst_methods_of(k) and dst[k] != paper[k]}


def is_rank_copy(path: Path) -> bool:
    """A torchrun run's rank r > 0 writes its own files to <run>/rank<r>/ (train/vit.py): the same
    run as <run>/summary.json, not another seed."""
    return re.fullmatch(r"rank[1-9][0-9]*", path.parent.name) is not None and (path.parent.parent / "summary.json").exists()


def collect(folders: list[Path]) -> dict:
    """{(entry, method, sparsity, variant): [summary, ...]} of every summary.json under the
    folders; variant lists the DST settings changed from the paper defaults that not every run
    shares (a setting all runs share, e.g. a common --delta-t, is said once in the text)."""
    runs, seen = [], set()
    for folder in folders:
        for path in sorted(Path(folder).rglob("summary.json")):
            if path.resolve() in seen or is_rank_copy(path):
                continue   # the same run reached twice (overlapping folders), or torchrun's copy of rank r > 0
            seen.add(path.resolve())
            s = json.loads(path.read_text())
            s["path"] = str(path)
            runs.append(s)
    changed = [_changed(s) if "dst" in s.get("config", {}) else set() for s in runs]
    # A setting every run that reads it shares (e.g. one --delta-t for all updating methods).
    common = {item for item in set().union(*changed)
              if all(item in ch for s, ch in zip(runs, changed)
                     if "dst" in s.get("config", {}) and s["method"] in dst_methods_of(item.split("=")[0]))}
    groups = defaultdict(list)
    for s, ch in zip(runs, changed):
        variant = " ".join(sorted(ch - common))
        groups[(s["entry"], s["method"], 0.0 if is_dense(s["method"]) else s["sparsity"], variant)].append(s)
    return groups


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def rows(groups: dict) -> list[dict]:
    out = []
    order = {m: i for i, m in enumerate(METHODS)}
    for (entry, method, sparsity, variant), runs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][2] > 0, kv[0][2], order.get(kv[0][1], 99), kv[0][3])):
        row = {"entry": entry, "method": method + (f" ({variant})" if variant else ""), "sparsity": sparsity,
               "seeds": sorted(r["config"]["seed"] for r in runs)}
        for name, get in METRICS[entry]:
            values = [get(r) for r in runs]
            row[name] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "values": values}
        row["density"] = statistics.mean(r["density"]["overall"] for r in runs)
        row["ms/step"] = statistics.median(r["step_time_ms"]["median"] for r in runs)
        row["steps"] = runs[0]["steps"]
        row["commands"] = [r["command"] for r in runs]
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    lines = []
    for entry in sorted({r["entry"] for r in table}):
        names = [n for n, _ in METRICS[entry]]
        lines.append(f"| {entry} method | sparsity | " + " | ".join(names) + " | density | ms/step | seeds |")
        lines.append("|---" * (len(names) + 5) + "|")
        for r in (r for r in table if r["entry"] == entry):
            cells = [mean_std(r[n]["values"]) for n in names]
            lines.append(f"| {r['method']} | {r['sparsity']:g} | " + " | ".join(cells)
                         + f" | {r['density']:.3f} | {r['ms/step']:.0f} | {len(r['seeds'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.table", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="run folders to search for summary.json")
    p.add_argument("--json", type=Path, help="also write the rows (with every seed's value and command) here")
    p.add_argument("--markdown", type=Path, help="also write the markdown table here")
    args = p.parse_args(argv)
    table = rows(collect(args.folders))
    if not table:
        print(f"python -m train.table: error: no summary.json under {', '.join(map(str, args.folders))}", file=sys.stderr)
        return 2
    text = markdown(table)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
