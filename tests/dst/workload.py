"""One sparse layer trained for a few steps with a mask update at every step after the first:
the workload of the always-sparse proof, the scaling test and the measurement script.

Run as a script to print update time and peak memory per method side by side:

    .venv/bin/python -m tests.dst.workload            # 4096 x 16384 at 99%, T = 8, 1 thread
    .venv/bin/python -m tests.dst.workload --in-features 32768 --density 0.005
    .venv/bin/python -m tests.dst.workload --widths 1,2,4   # same nnz at 1x, 2x, 4x the width

With --widths each method's update time is measured at in_features x factor and density /
factor (the same nnz), the widths alternating within each round, and printed as the ratio to
the first width (1.0 = the cost follows nnz; the factor = it follows out * in).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch import nn

import dst

from .census import TensorCensus

# (label, method, config overrides): every method, and every grow mode of the gradient rules.
VARIANTS = [
    ("static", "static", {}),
    ("set", "set", {}),
    ("rigl exact", "rigl", {"grow": "exact"}),
    ("rigl graest", "rigl", {"grow": "graest"}),
    ("gse uniform", "gse", {"grow": "uniform"}),
    ("gse grabo", "gse", {"grow": "grabo"}),
    ("gse graest", "gse", {"grow": "graest"}),
    ("gse global", "gse", {"grow": "uniform", "scope": "global"}),
    ("srigl exact", "srigl", {"grow": "exact"}),
    ("srigl uniform", "srigl", {"grow": "uniform"}),
    ("dynadiag", "dynadiag", {}),
]


def run(method: str, overrides: dict, out_features: int, in_features: int, density: float, *, tokens: int = 8,
        steps: int = 3, census: TensorCensus | None = None, seed: int = 0) -> dict:
    """Build the layer, its Sparsifier and Adam, train ``steps`` steps (updates at steps 1..);
    DynaDiag resamples at step 1 and freezes at the last step.

    Returns {"update_s": [seconds of each update], "update_peak": [peak bytes created during
    each update], "step_peak": [peak bytes of each forward/backward/optimizer step], "stats":
    [the update stats], "layer": the layer}. With ``census`` everything runs inside it.
    """
    cfg = dst.DSTConfig(method=method, sparsity=1 - density, delta_t=1, t_end=1.0, seed=seed,
                        freeze_at=(steps - 1) / steps, **overrides)
    gen = torch.Generator().manual_seed(seed)
    result = {"update_s": [], "update_peak": [], "step_peak": [], "stats": []}
    with census if census is not None else contextlib.nullcontext():
        layer = dst.make_layer(cfg, in_features, out_features, density, generator=gen)
        model = nn.Sequential(layer)
        sparsifier = dst.Sparsifier(model, cfg, steps)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        target = torch.randn(tokens, out_features, generator=gen)
        for step in range(steps):
            x = torch.randn(tokens, in_features, generator=gen)
            if census is not None:
                census.reset_peak()
            with sparsifier.capture(step):
                loss = (model(x) - target).square().mean()
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if census is not None:
                result["step_peak"].append(census.peak_bytes)
                census.reset_peak()
            start = time.perf_counter()
            stats = sparsifier.step(step, optimizer)
            seconds = time.perf_counter() - start
            if stats is not None:
                result["update_s"].append(seconds)
                result["stats"].append(stats)
                if census is not None:
                    result["update_peak"].append(census.peak_bytes)
    result["layer"] = layer
    return result


def width_scaling(args, factors: list[int], rounds: int) -> None:
    """Update seconds per method at the same nnz and growing width, rounds alternating."""
    print(f"{'method':<15} {'nnz':>9} " + " ".join(f"{f'{f}x width s':>12}" for f in factors)
          + " " + " ".join(f"{f'{f}x / {factors[0]}x':>10}" for f in factors[1:]))
    for label, method, overrides in VARIANTS:
        if method == "static":
            continue
        seconds: dict[int, list[float]] = {f: [] for f in factors}
        for _ in range(rounds):
            for f in factors:
                timed = run(method, overrides, args.out_features, args.in_features * f, args.density / f,
                            tokens=args.tokens, steps=args.steps)
                seconds[f] += timed["update_s"]
                nnz = timed["layer"].nnz()
        med = {f: sorted(v)[len(v) // 2] for f, v in seconds.items()}
        print(f"{label:<15} {nnz:>9} " + " ".join(f"{med[f]:>12.4f}" for f in factors) + " "
              + " ".join(f"{med[f] / med[factors[0]]:>10.2f}" for f in factors[1:]), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-features", type=int, default=4096)
    p.add_argument("--in-features", type=int, default=16384)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 threads spin and run 10-50x slower)")
    p.add_argument("--widths", default="", help="comma-separated width factors at the same nnz, e.g. 1,2,4")
    p.add_argument("--rounds", type=int, default=3, help="with --widths: rounds over the widths")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.out_features * args.in_features
    print(f"layer {args.out_features} x {args.in_features} ({size / 1e6:.1f} M entries), density {args.density}, "
          f"T = {args.tokens}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.widths:
        width_scaling(args, [int(f) for f in args.widths.split(",")], args.rounds)
        return
    print(f"{'method':<15} {'nnz':>9} {'update s (median)':>18} {'update peak MiB':>16} "
          f"{'step peak MiB':>14} {'largest tensor / (out*in)':>26}")
    for label, method, overrides in VARIANTS:
        timed = run(method, overrides, args.out_features, args.in_features, args.density,
                    tokens=args.tokens, steps=args.steps)
        census = TensorCensus()
        counted = run(method, overrides, args.out_features, args.in_features, args.density,
                      tokens=args.tokens, steps=args.steps, census=census)
        times = sorted(timed["update_s"])
        median = times[len(times) // 2] if times else float("nan")
        upeak = max(counted["update_peak"], default=0) / 2 ** 20
        speak = max(counted["step_peak"], default=0) / 2 ** 20
        print(f"{label:<15} {timed['layer'].nnz():>9} {median:>18.3f} {upeak:>16.1f} {speak:>14.1f} "
              f"{census.largest / size:>26.4f}", flush=True)


if __name__ == "__main__":
    main()
