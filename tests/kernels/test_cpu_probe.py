"""The AMX kernels' first-run check (kernels.cpu._amx_probe): a child process runs them once per
build and CPU; a crash, a wrong result or a timeout leaves "amx" out of features() with the reason
(missing_feature), the verdict is kept beside the library (except a timeout's), and the check
itself finds wrong products. Run on the emu build (KERNELS_CPU_PROBE=1 probes it; the real amx
build is probed by default)."""
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

from kernels import cpu

from .test_cpu_native import emu_library  # noqa: F401


@pytest.fixture
def probed(monkeypatch, tmp_path):
    """The emu build reloaded with the check on, its verdict kept in tmp_path; the calls of the
    child process counted."""
    monkeypatch.setenv(cpu.PROBE_ENV, "1")
    monkeypatch.setattr(cpu, "_probe_marker", lambda so_path: tmp_path / "probe")
    runs = []
    real = cpu._probe_command

    def command():
        runs.append(1)
        return real()
    monkeypatch.setattr(cpu, "_probe_command", command)
    return runs


def _reload():
    cpu.reset()
    assert cpu.lib() is not None and cpu.loaded_variant() == "emu"
    return cpu.features()


def test_the_check_passes_once_and_is_kept(emu_library, probed, tmp_path):
    assert "amx" in _reload()
    assert probed == [1] and (tmp_path / "probe").read_text().split("\n")[0] == "ok"
    assert "amx" in _reload() and probed == [1]  # kept: no second child
    (tmp_path / "probe").write_text("ok\nanother CPU\n")
    assert "amx" in _reload() and probed == [1, 1]  # another CPU's verdict: checked again


@pytest.mark.parametrize("child, expect", [
    ("import os; os.abort()", "killed by SIGABRT"),
    ("import sys; print('bsr16_mm_amx: max error 3', file=sys.stderr); sys.exit(1)", "exit 1: bsr16_mm_amx: max error 3"),
])
def test_a_failed_check_drops_amx_and_says_why(emu_library, probed, monkeypatch, tmp_path, child, expect):
    monkeypatch.setattr(cpu, "_probe_command", lambda: (probed.append(1), [sys.executable, "-c", child])[1])
    feats = _reload()
    assert "amx" not in feats and "blocks_dpbf16" in feats  # the AVX-512-BF16 block products stay
    why = cpu.missing_feature("amx")
    assert "failed their first run" in why and expect in why, why
    assert "step by step: arch_prctl's grant of the tile data: ok;" in why and "TDPBF16PS: ok" in why, why
    assert (tmp_path / "probe").read_text().split("\n")[0] == why  # kept
    assert "amx" not in _reload() and probed == [1]
    # the layers still run their bf16 block products (AVX-512-BF16 instead of AMX)
    g = torch.Generator().manual_seed(5)
    dy, x = torch.randn(20, 32, generator=g).bfloat16(), torch.randn(20, 48, generator=g).bfloat16()
    rows, cols = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
    got = cpu.sddmm_blocks(dy, x, rows, cols, 16)
    want = torch.stack([dy[:, :16].double().t() @ x[:, 32:].double(), dy[:, 16:].double().t() @ x[:, :16].double()])
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)


def test_a_timed_out_check_is_not_kept(emu_library, probed, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "PROBE_TIMEOUT_S", 1)
    monkeypatch.setattr(cpu, "_probe_command", lambda: [sys.executable, "-c", "import time; time.sleep(30)"])
    assert "amx" not in _reload()
    assert "took over 1 s" in cpu.missing_feature("amx")
    assert not (tmp_path / "probe").exists()


def test_the_check_is_off_by_default_off_amx_builds_and_with_0(emu_library, monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_probe_marker", lambda so_path: tmp_path / "probe")
    monkeypatch.setattr(cpu, "_probe_command", lambda: pytest.fail("no child expected"))
    for setting in (None, "0"):
        if setting is None:
            monkeypatch.delenv(cpu.PROBE_ENV, raising=False)
        else:
            monkeypatch.setenv(cpu.PROBE_ENV, setting)
        assert "amx" in _reload()
    assert cpu._amx_probe(tmp_path / "lib.so", "amx") is None  # "0": even the amx build


@pytest.mark.parametrize("broken", ["_bsr16_matmul", "_sddmm_blocks_amx"])
def test_the_check_finds_a_wrong_product(emu_library, monkeypatch, broken):
    assert cpu._probe_amx_run() is None
    real = getattr(cpu, broken)
    monkeypatch.setattr(cpu, broken, lambda *a, **k: real(*a, **k).mul_(1.001))
    wrong = cpu._probe_amx_run()
    assert wrong is not None and wrong.startswith({"_bsr16_matmul": "bsr16_mm_amx",
                                                   "_sddmm_blocks_amx": "sddmm_blocks_amx"}[broken]), wrong


# The AMX instructions one step at a time (kernels.cpu.amx_steps, sparse_cpu.c's amx_selftest): the
# diagnosis a failed first-run check adds, each step in a child process of its own.

needs_builds = pytest.mark.skipif(
    not (platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu._cpu_flags()
         and (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc"))),
    reason="builds the x86-64 variants (the emu one runs on avx2 + fma) with a C compiler")


@needs_builds
def test_every_amx_step_passes_on_the_emulated_instructions():
    steps = cpu.amx_steps(cpu.build("emu"))
    assert steps == [(name, "ok") for name in cpu.AMX_STEPS]


@needs_builds
def test_the_first_faulting_step_is_named_with_the_fault():
    """Tiles without arch_prctl's grant: the emulation ends the process at LDTILECFG, as Linux's
    SIGILL would; the steps after it are not run."""
    steps = cpu.amx_steps(cpu.build("emu"), grant=False)
    assert [name for name, _ in steps] == list(cpu.AMX_STEPS[:2]) and steps[0][1] == "skipped"
    assert steps[1][1].startswith("killed by SIGABRT") and "LDTILECFG: the process has no tile state" in steps[1][1]


@needs_builds
@pytest.mark.parametrize("code, expect", [(4, "a wrong result"), (7, "exit 7: no output")])
def test_a_wrong_result_or_another_exit_stops_the_steps(monkeypatch, code, expect):
    monkeypatch.setattr(cpu, "_amx_step_command",
                        lambda so_path, step, grant: [sys.executable, "-c", f"exit({code} if {step} == 4 else 0)"])
    assert cpu.amx_steps(cpu.build("emu")) == [(name, "ok") for name in cpu.AMX_STEPS[:3]] + [("TILELOADD", expect)]


@needs_builds
def test_the_real_amx_build_reports_this_cpus_grant():
    """The amx build's own steps on this CPU: without AMX (the EPYCs) the kernel refuses the grant
    and says whether it supports XTILEDATA at all - a syscall, no tile instruction runs; with AMX
    every step passes on the real instructions."""
    steps = cpu.amx_steps(cpu.build("amx"))
    if {"amx_tile", "amx_bf16"} <= cpu._cpu_flags():
        assert steps == [(name, "ok") for name in cpu.AMX_STEPS]
    else:
        assert len(steps) == 1 and steps[0][0] == cpu.AMX_STEPS[0], steps
        assert steps[0][1].startswith("refused") and "XTILEDATA not supported" in steps[0][1], steps


@needs_builds
def test_a_build_without_amx_kernels_says_so():
    path = cpu.build("avx2")
    assert cpu.amx_steps(path) == [("AMX kernels", f"none in {path.name}: its build has no AMX")]


@needs_builds
def test_python_m_kernels_cpu_amx_steps_prints_each_step(tmp_path):
    env = {**os.environ, "KERNELS_CPU_VARIANT": "emu", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run([sys.executable, "-m", "kernels.cpu", "--amx-steps"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step by step (emu build" in proc.stdout
    for name in cpu.AMX_STEPS:
        assert f"  {name}: ok" in proc.stdout
