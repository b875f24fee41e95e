"""The AMX kernels' first-run check (kernels.cpu._amx_probe): a child process runs them once per
build and CPU; a crash, a wrong result or a timeout leaves "amx" out of features() with the reason
(missing_feature), the verdict is kept beside the library (except a timeout's), and the check
itself finds wrong products. Run on the emu build (KERNELS_CPU_PROBE=1 probes it; the real amx
build is probed by default)."""
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
