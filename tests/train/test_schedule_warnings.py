"""train/common.schedule_warnings: a run whose flags make the DST schedule or the warm-up a
no-op says so on stderr and in summary.json."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dst import DSTConfig
from train import common, vit

ROOT = Path(__file__).resolve().parents[2]


def test_thirty_steps_with_the_defaults_warn_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "train.vit", "--method", "rigl", "--preset", "micro", "--steps", "30",
                           "--batch-size", "16", "--eval-examples", "64", "--out-dir", str(out), "--no-progress",
                           "--no-plots", "--threads", "1"], cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: no mask update will happen: --delta-t 100" in done.stderr, done.stderr
    assert "warning: --warmup 100 > --steps 30" in done.stderr, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mask_updates"] == 0 and len(summary["warnings"]) == 2


@pytest.mark.parametrize("method, flags, expected", [
    ("rigl", dict(delta_t=100), ["no mask update"]),
    ("rigl", dict(delta_t=20), []),                      # steps 20 and 40 are below 0.75 x 60 = 45
    ("rigl", dict(delta_t=45), ["no mask update"]),      # step 45 is the horizon itself: excluded
    ("gse", dict(delta_t=1000), ["no mask update"]),
    ("static", dict(delta_t=1000), []),
    ("dense", {}, []),
    ("dynadiag", dict(delta_t=100), ["no DynaDiag resampling"]),
    ("dynadiag", dict(delta_t=10), []),                  # step 10 < freeze at 0.3 x 60 = 18
])
def test_a_schedule_with_no_update_warns(method, flags, expected):
    cfg = vit.Config(steps=60, warmup=10, dst=DSTConfig.for_method(method, **flags))
    got = common.schedule_warnings(cfg)
    assert len(got) == len(expected) and all(e in g for e, g in zip(expected, got)), got


def test_a_warmup_longer_than_the_run_warns():
    cfg = vit.Config(steps=60, warmup=60, dst=DSTConfig.for_method("rigl", delta_t=10))
    assert common.schedule_warnings(cfg) == []   # the last step reaches the peak
    assert common.schedule_warnings(dataclasses.replace(cfg, warmup=120)) == [
        "--warmup 120 > --steps 60: the learning rate never reaches --lr 0.003 (it peaks at 0.0015); lower --warmup"]


@pytest.mark.parametrize("flags, x86, precision, device, warns", [
    ({"avx2", "fma"}, True, "bf16", "cpu", True),                              # the AMD EPYC
    ({"avx2", "fma", "avx512f", "avx512_bf16"}, True, "bf16", "cpu", False),   # an AVX-512-BF16 Xeon
    ({"avx2", "fma", "amx_tile", "amx_bf16"}, True, "bf16", "cpu", False),
    ({"avx2", "fma"}, True, "fp32", "cpu", False),
    ({"avx2", "fma"}, True, "auto", "cpu", False),                             # auto is fp32 on CPU
    ({"avx2", "fma"}, True, "bf16", "cuda", False),
    ({"avx2", "fma"}, False, "bf16", "cpu", False),                            # not x86-64: cannot tell
    (set(), True, "bf16", "cpu", False),                                       # no /proc/cpuinfo
])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(flags, x86, precision, device, warns, monkeypatch):
    monkeypatch.setattr(common.kernels.cpu, "_cpu_flags", lambda: set(flags))
    monkeypatch.setattr(common.kernels.cpu, "_x86_64", lambda: x86)
    cfg = vit.Config(steps=60, warmup=10, precision=precision, dst=DSTConfig.for_method("rigl", delta_t=10))
    got = common.warn_schedule(cfg, "train.vit", torch.device(device))
    assert got == ([common.precision_warning("bf16", torch.device("cpu"))] if warns else []), got
    assert not warns or "slower than under --precision fp32" in got[0]


def test_a_bf16_cpu_run_names_the_slow_dense_matmuls_where_the_cpu_lacks_bf16(tmp_path):
    """On the command line and in summary.json, where this CPU lacks avx512_bf16 / amx_bf16
    (the AMD EPYC); not where it has them (the Xeon)."""
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "train.vit", "--method", "rigl", "--preset", "micro", "--steps", "2",
                           "--batch-size", "4", "--eval-examples", "8", "--out-dir", str(out), "--no-progress",
                           "--no-plots", "--threads", "1", "--precision", "bf16", "--device", "cpu"], cwd=ROOT,
                          env={**os.environ, "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = common.kernels.cpu.bf16_instructions() is False
    assert ("warning: --precision bf16 on a CPU without bf16 instructions" in done.stderr) == expected, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert any("--precision bf16" in w for w in summary["warnings"]) == expected, summary["warnings"]
