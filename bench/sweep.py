"""Correctness-gated launch-config sweep of every kernel, the tuned per-device table, and the
speed tables against dense, CSR, (fan-in) the surviving-neuron GEMM and (fused MLP) the
unfused diagonal MLP.

    python bench/sweep.py                          # full grid on a GPU (split it with --ops)
    python bench/sweep.py --ops diag_fwd,diag_dx --tokens 50432 --dtypes bfloat16
    python bench/sweep.py --ops mlp_fwd --mlp-shapes 768x3072 --blocks 16,32,64
    python bench/sweep.py --quick                  # CPU: the whole pipeline, interpreter, < 2 min
                                                   # (what a bare run does without a GPU; --full: the grid anyway)

1. Tune. For every case at the tuning sparsities, each candidate launch config runs through
   the real launcher (the config is injected where the launcher looks up its table entry),
   its output is compared with the fp64 reference (``common.gate``) with fresh outputs
   NaN-poisoned, and only a passing candidate is timed. A wrong or failing one is logged as
   rejected and never timed. Cases that share a table key (kernel, dtype, token bucket, b)
   elect one winner: the lowest geometric mean of time / best time over the group.
2. Write the winners into ``<table-dir>/<device>.json`` (merged: other entries are kept).
3. Report. Every case is gated and timed again with the config the kernel itself now picks
   from the table, beside its baselines; rows are appended to ``sweep.csv`` and the markdown
   report and the plot are rebuilt from the latest row of every case, so runs split by
   ``--ops`` add up to one report.

Outputs in --out: sweep.csv, candidates.csv, tuning.csv (appended), sweep.md, speedup.png (the
report: bench/sweep_report.py).
Formulas: speed-up = baseline time / kernel time (same inputs, same dtype); TFLOP/s =
2 T nnz / time (useful work only); GB/s = (T (in + out) + nnz) x bytes per element + index
bytes, over time (the traffic of a perfect kernel). The fused MLP (``mlp_fwd``, shapes from
--mlp-shapes as DIMxHIDDEN) counts nnz = nnz1 + nnz2 and moves T 2 dim activations (x in,
y out: the hidden never leaves the chip) plus both layers' values, offsets and biases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.ops import BASELINES, GATED_BASELINES, OPS, Case, Problem, candidate_space  # noqa: E402
from bench.sweep_report import CASE_FIELDS, plot, read_latest, targets, training_rows, write_report  # noqa: E402, F401
from kernels import runtime as rt  # noqa: E402

# ViT-B/16 and BERT-base linears (in x out): fc1, fc2, qkv, and their MLP (dim x hidden,
# fused op only); T = 1 (online), 256, 4096 and 256 x 197 = 50,432 (a ViT-B/16 batch of 256).
FULL = dict(shapes="768x3072,3072x768,768x2304", mlp_shapes="768x3072", tokens="1,256,4096,50432",
            sparsities="0.8,0.9,0.95,0.99", tune_sparsities="0.9", blocks="1,16,32,64",
            dtypes="float16,bfloat16", ablations="0,0.3")
# Interpreter-sized: every op, both kinds of diagonal kernel, ablation, two token counts; the
# MLP at 64 -> 128 -> 64, b = 16 (K1 = K2 = 2 of 8 diagonals at 75%, 1 at 90%).
QUICK = dict(shapes="64x128,128x64", mlp_shapes="64x128", tokens="1,40", sparsities="0.75,0.9",
             tune_sparsities="0.9", blocks="1,16", dtypes="bfloat16", ablations="0.25")

SWEEP_FIELDS = (["run", "device", "mode"] + CASE_FIELDS +
                ["params", "nnz", "kernel", "key", "config", "config_source", "status", "reason",
                 "gate_err", "gate_bound", "kernel_ms"] +
                [f"{b}_ms" for b in BASELINES] + [f"x_{b}" for b in BASELINES] +
                ["csr_note", "tflops", "gbps"])
CAND_FIELDS = (["run", "device", "mode"] + CASE_FIELDS +
               ["kernel", "key", "config", "status", "reason", "gate_err", "gate_bound", "ms"])
TUNE_FIELDS = ["run", "device", "mode", "kernel", "key", "winner", "default", "n_cases", "n_candidates",
               "n_rejected", "x_default", "winner_ms_geomean"]



_LOG_EACH_UP_TO = 8  # candidates of a key whose every time the log shows (bench/gpu_check.sh's side-by-side phase)


def _floats(s):
    return [float(v) for v in str(s).split(",") if v.strip()]


def _ints(s):
    return [int(v) for v in str(s).split(",") if v.strip()]


def _shapes(s):
    out = []
    for item in str(s).split(","):
        a, b = item.lower().split("x")
        out.append((int(a), int(b)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes through the Triton interpreter on CPU (pipeline check, no speed figures); "
                        "the default without a GPU")
    p.add_argument("--full", action="store_true",
                   help="the full grid even without a GPU (through the interpreter: days; no speed figures)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results/<device> or bench/results/quick)")
    p.add_argument("--table-dir", type=Path, default=None,
                   help="folder of the tuned tables (default kernels/configs; with --quick, <out>/configs)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    p.add_argument("--shapes", default=None, help="comma list of INxOUT (W is [out, in]) of the single-layer ops")
    p.add_argument("--mlp-shapes", default=None,
                   help="comma list of DIMxHIDDEN of mlp_fwd (fc1 dim -> hidden, fc2 hidden -> dim)")
    p.add_argument("--tokens", default=None, help="comma list of T (rows of x)")
    p.add_argument("--sparsities", default=None, help="sparsities reported")
    p.add_argument("--tune-sparsities", default=None, help="sparsities the configs are tuned at")
    p.add_argument("--blocks", default=None, help="diagonal block sizes (mlp_fwd takes those >= 16)")
    p.add_argument("--dtypes", default=None, help="float16, bfloat16, float32")
    p.add_argument("--ablations", default=None,
                   help="fan-in: fractions of ablated neurons (a chosen illustration, not measured from training)")
    p.add_argument("--no-tune", action="store_true", help="skip tuning: report with the current table")
    p.add_argument("--no-write-table", action="store_true", help="tune but do not write the table")
    p.add_argument("--max-candidates", type=int, default=48,
                   help="try at most N candidates per table key: the default plus a seeded random sample "
                        "of the rest (0: all of them)")
    p.add_argument("--extra-candidate", action="append", default=[], metavar="KERNEL=JSON",
                   help='add a candidate, e.g. fanin_fwd=\'{"BLOCK_T": 16}\' (repeatable)')
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up (GPU)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench repetition time (GPU)")
    p.add_argument("--cpu-reps", type=int, default=None, help="timed calls per measurement on CPU")
    p.add_argument("--budget-s", type=float, default=0,
                   help="stop starting new tuning keys / report cases after this many seconds (0: no limit)")
    p.add_argument("--resume", action="store_true",
                   help="skip table keys already tuned and cases already in sweep.csv for this device")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    # Without a GPU the full grid through the interpreter would take days and time numpy: a bare
    # run checks the pipeline instead (main says so).
    args.cpu_default = not (args.quick or args.full or torch.cuda.is_available())
    args.quick = args.quick or args.cpu_default
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.cpu_reps is None:
        args.cpu_reps = 1 if args.quick else 20
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {OPS}")
    args.shapes = _shapes(args.shapes)
    args.mlp_shapes = _shapes(args.mlp_shapes)
    args.tokens = _ints(args.tokens)
    args.sparsities = _floats(args.sparsities)
    args.tune_sparsities = _floats(args.tune_sparsities)
    args.blocks = _ints(args.blocks)
    try:
        args.dtypes = [str(common.parse_dtype(d.strip())).removeprefix("torch.") for d in args.dtypes.split(",")]
    except ValueError as e:
        p.error(str(e))
    args.ablations = _floats(args.ablations)
    extras = {}
    for item in args.extra_candidate:
        kernel, _, cfg = item.partition("=")
        try:
            extras.setdefault(kernel.strip(), []).append(json.loads(cfg))
        except json.JSONDecodeError as e:
            p.error(f"--extra-candidate {item!r}: {e}")
    args.extras = extras
    if args.out is None:
        args.out = common.RESULTS / ("quick" if args.quick else rt.device_key())
    if args.table_dir is None:
        args.table_dir = args.out / "configs" if args.quick else common.ROOT / "kernels" / "configs"
    return args


def build_cases(args, sparsities, ablations) -> list[Case]:
    cases = []
    for op in args.ops:
        fmt = op.split("_")[0]
        blocks = args.blocks if fmt in ("diag", "mlp") else [1]
        ablations = ablations if fmt == "fanin" else [0.0]
        # The MLP has its own shapes (dim x hidden): fc1 and fc2 of one block, not one layer.
        for (n_in, n_out) in (args.mlp_shapes if fmt == "mlp" else args.shapes):
            for T in args.tokens:
                for s in sparsities:
                    for b in blocks:
                        for dtype in args.dtypes:
                            for abl in ablations:
                                c = Case(op, n_in, n_out, T, s, b, dtype, abl)
                                if c.valid():
                                    cases.append(c)
    return cases


class Checks:
    """Per-call index checks off while timing (they synchronise); on for the gate."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.previous = rt.checks_enabled()
        rt.set_checks(self.enabled)

    def __exit__(self, *exc):
        rt.set_checks(self.previous)


def references(prob: Problem):
    truth = prob.reference(torch.float64)
    lowp = prob.reference(prob.dtype) if prob.dtype in (torch.float16, torch.bfloat16) else None
    return truth, lowp


def gated_time(prob: Problem, truth, lowp, args, fn=None) -> dict:
    """Gate the kernel as the launcher configures it now (or ``fn``, a baseline built on our
    own kernels), then time it if (and only if) it passed. Returns status ("timed" |
    "rejected"), reason, gate_err, gate_bound, ms."""
    fn = prob.run if fn is None else fn
    try:
        with Checks(True), common.poisoned_empty():
            out = fn()
            common.synchronize()
    except Exception as e:  # noqa: BLE001 - a failing candidate (compile, resources, launch) is a result
        msg = str(e).strip().splitlines()
        return dict(status="rejected", reason=f"error: {type(e).__name__}: {msg[0][:160] if msg else ''}",
                    gate_err=math.nan, gate_bound=math.nan, ms=math.nan)
    ok, err, bound, reason = common.gate(out, truth, lowp)
    del out
    if not ok:
        return dict(status="rejected", reason=reason, gate_err=err, gate_bound=bound, ms=math.nan)
    with Checks(False):
        ms = common.bench_ms(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps)
    return dict(status="timed", reason="", gate_err=err, gate_bound=bound, ms=ms)


def probe(prob: Problem) -> tuple[str, dict, dict]:
    calls = common.probe_launch(prob.run)
    if len(calls) != 1:
        raise RuntimeError(f"{prob.case.label()}: expected one launch_config lookup, saw {len(calls)}")
    return calls[0]


def _free():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tune(args, cases, run_info, save, out_of_time, log=print) -> dict[str, dict[str, dict]]:
    """Elect a winner per table key; ``save(kernel, key, config)`` stores each one as soon as
    it is known (a sweep cut short keeps what it finished)."""
    dev = common.device()
    groups: dict[tuple[str, str], dict] = {}
    for case in cases:
        prob = Problem(case, dev, args.seed)
        kernel, key, default = probe(prob)
        g = groups.setdefault((kernel, rt.format_key(key)),
                              dict(kernel=kernel, key=key, default=default, cases=[], t_max=0, block=1))
        g["cases"].append(case)
        g["t_max"] = max(g["t_max"], case.tokens)
        g["block"] = max(g["block"], case.block)
        del prob
    winners: dict[str, dict[str, dict]] = {}
    rng = random.Random(args.seed)
    done = common.read_table(common.table_path(args.table_dir, run_info["device"])) if args.resume else {}
    for (kernel, keystr), g in sorted(groups.items()):
        if keystr in done.get(kernel, {}):
            log(f"[tune] {kernel} {keystr}: already in the table (--resume)")
            continue
        if out_of_time():
            log(f"[tune] time budget spent: {kernel} {keystr} and the keys after it not tuned (re-run with --resume)")
            break
        cands = candidate_space(g["default"], g["t_max"], g["block"], args.quick)
        if args.max_candidates and len(cands) > args.max_candidates:
            cands = cands[:1] + rng.sample(cands[1:], args.max_candidates - 1)
        for extra in args.extras.get(kernel, []):
            cfg = dict(g["default"])
            cfg.update(extra)
            cands.append(cfg)
        log(f"[tune] {kernel} {keystr}: {len(cands)} candidates x {len(g['cases'])} cases")
        times = [dict() for _ in cands]  # candidate -> {case: ms}
        rows = []
        for case in g["cases"]:
            prob = Problem(case, dev, args.seed)
            truth, lowp = references(prob)
            for i, cfg in enumerate(cands):
                with common.forced_config(kernel, cfg):
                    res = gated_time(prob, truth, lowp, args)
                if res["status"] == "timed":
                    times[i][case] = res["ms"]
                else:
                    log(f"  rejected {json.dumps(cfg, sort_keys=True)} on {case.label()}: {res['reason']}")
                rows.append(dict(run_info, **case.fields(), kernel=kernel, key=keystr, config=cfg, **res))
            del prob, truth, lowp
            _free()
        common.append_csv(args.out / "candidates.csv", rows, CAND_FIELDS)
        if len(cands) <= _LOG_EACH_UP_TO:  # a side-by-side comparison: every time in the log
            for i, cfg in enumerate(cands):
                for case, ms in times[i].items():
                    log(f"  {json.dumps(cfg, sort_keys=True)} on {case.label()}: {ms:.4f} ms")
        best = {case: min((t[case] for t in times if case in t), default=math.nan) for case in g["cases"]}
        full = [i for i, t in enumerate(times) if len(t) == len(g["cases"])]
        if not full:
            log(f"  no candidate passed every case of {kernel} {keystr}: the table keeps its entry")
            continue
        score = {i: common.geomean([times[i][c] / best[c] for c in g["cases"]]) for i in full}
        win = min(full, key=lambda i: (score[i], i))
        x_default = (common.geomean([times[0][c] / times[win][c] for c in g["cases"]])
                     if 0 in full else math.nan)
        winners.setdefault(kernel, {})[keystr] = cands[win]
        save(kernel, keystr, cands[win])
        n_rej = sum(1 for r in rows if r["status"] == "rejected")
        common.append_csv(args.out / "tuning.csv", [dict(
            run_info, kernel=kernel, key=keystr, winner=cands[win], default=g["default"],
            n_cases=len(g["cases"]), n_candidates=len(cands), n_rejected=n_rej, x_default=x_default,
            winner_ms_geomean=common.geomean(times[win].values()))], TUNE_FIELDS)
        log(f"  winner {json.dumps(cands[win], sort_keys=True)} ({x_default:.2f}x the default)")
    return winners


def report_case(args, case: Case, run_info: dict) -> dict:
    dev = common.device()
    prob = Problem(case, dev, args.seed)
    kernel, key, default = probe(prob)
    keystr = rt.format_key(key)
    table = rt.config_table().get(kernel, {})
    config = rt.launch_config(kernel, key, default)
    row = dict(run_info, **case.fields(), params=prob.params, nnz=prob.nnz, kernel=kernel, key=keystr,
               config=config, config_source="table" if keystr in table else "default")
    truth, lowp = references(prob)
    res = gated_time(prob, truth, lowp, args)
    row.update(status=res["status"], reason=res["reason"], gate_err=res["gate_err"],
               gate_bound=res["gate_bound"], kernel_ms=res["ms"])
    if res["status"] == "timed":
        ms = res["ms"]
        row["tflops"] = prob.flops() / (ms * 1e-3) / 1e12
        row["gbps"] = prob.min_bytes() / (ms * 1e-3) / 1e9
    for name, (fn, note) in prob.baselines().items():
        if name in GATED_BASELINES:  # our own kernels: gated like the kernel, never timed when wrong
            base = gated_time(prob, truth, lowp, args, fn)
            if base["status"] != "timed":
                why = f"{name} baseline rejected: {base['reason']}"
                row["reason"] = f"{row['reason']}; {why}" if row["reason"] else why
                row.setdefault("rejected_baselines", []).append(name)
                continue
            t = base["ms"]
        else:
            t = common.bench_ms(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=args.cpu_reps)
        row[f"{name}_ms"] = t
        if res["status"] == "timed":
            row[f"x_{name}"] = t / res["ms"]
        if name == "csr":
            row["csr_note"] = note
    del prob, truth, lowp
    _free()
    return row


def main(argv=None, log=print) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    head = common.header()
    mode = "interpreter" if common.interpreting() else ("gpu" if torch.cuda.is_available() else "cpu")
    if args.cpu_default:
        log("no GPU: running the --quick pipeline check (tiny shapes through the Triton interpreter); "
            "the full grid there would take days - --full runs it anyway")
    elif not torch.cuda.is_available() and not args.quick:
        log("no GPU: the full grid through the interpreter (--full) would take days and measures numpy, "
            "not the kernels")
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + head["git"]
    run_info = dict(run=run_id, device=head["table"], mode=mode)
    log("\n".join(f"{k}: {v}" for k, v in head.items()))
    # Tuned without ablation: the key does not see it and the kernels' work per row is the same.
    tune_cases = build_cases(args, args.tune_sparsities, [0.0])
    report_cases = build_cases(args, args.sparsities, args.ablations)
    table_file = common.table_path(args.table_dir, head["table"])
    t_start = time.monotonic()

    def out_of_time() -> bool:
        return bool(args.budget_s) and time.monotonic() - t_start > args.budget_s

    meta = {k: head[k] for k in ("gpu", "driver", "torch", "triton", "git", "date") if k in head}
    meta["written_by"] = "python bench/sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def save(kernel, keystr, config):
        if not args.no_write_table:
            common.merge_table(table_file, {kernel: {keystr: config}}, meta)

    if not args.no_tune:
        winners = tune(args, tune_cases, run_info, save, out_of_time, log)
        if winners and not args.no_write_table:
            log(f"[table] {sum(len(v) for v in winners.values())} entries merged into {table_file}")
    done = set()
    if args.resume:
        done = {tuple(r[k] for k in CASE_FIELDS) for r in read_latest(args.out / "sweep.csv", ["device"] + CASE_FIELDS)
                if r.get("device") == head["table"]}
    rows = []
    with common.table_dir(args.table_dir):
        for case in report_cases:
            if tuple(str(common.cell(case.fields()[k])) for k in CASE_FIELDS) in done:
                continue
            if out_of_time():
                log("[report] time budget spent: the remaining cases were not run (re-run with --resume)")
                break
            row = report_case(args, case, run_info)
            rows.append(row)
            common.append_csv(args.out / "sweep.csv", [row], SWEEP_FIELDS)
            log(f"[report] {case.label()}: {row['status']} kernel {common.fmt(row.get('kernel_ms'))} ms, "
                f"dense {common.fmt(row.get('dense_ms'))} ms, x dense {common.fmt(row.get('x_dense'))}"
                + (f" ({row['reason']})" if row["reason"] else ""))
    write_report(args.out, head)
    log(f"[out] {args.out}/sweep.md, sweep.csv, candidates.csv, tuning.csv, speedup.png; table {table_file}")
    if mode == "interpreter":
        log(common.INTERPRETER_NOTE)
    bad = [r for r in rows if r["status"] != "timed" or r.get("rejected_baselines")]
    if bad:
        log(f"{len(bad)} case(s) failed the gate with the tuned config (the kernel or a gated baseline): "
            "see sweep.md")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
