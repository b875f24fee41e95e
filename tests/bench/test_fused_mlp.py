"""bench/fused_mlp.py: the --quick run gates and times every variant through the interpreter
and writes its tables; a wrong variant is refused before timing; the FLOP model."""
import math
import subprocess
import sys

import pytest
import torch

from bench import fused_mlp

from .conftest import ROOT, read_rows

I32 = torch.int32


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick is the CPU interpreter check")
def test_quick_run_times_every_variant_and_says_timings_are_not_speed_figures(tmp_path):
    proc = subprocess.run([sys.executable, "bench/fused_mlp.py", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT speed figures" in proc.stdout
    rows = read_rows(tmp_path / "fused_mlp.csv")
    assert {(r["variant"], r["block"]) for r in rows} == {("dense", "-"), ("unfused", "16"), ("fused", "16"),
                                                          ("unfused", "32"), ("fused", "32")}
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "interpreter", r
        assert float(r["fwd_ms"]) > 0 and float(r["fwdbwd_ms"]) > 0
        assert float(r["x_dense_fwd"]) > 0 and float(r["x_dense_fwdbwd"]) > 0
        assert 0 <= float(r["max_err"]) <= 1  # worst error / allowed error
    for r in rows:
        if r["variant"] == "fused":
            assert float(r["x_unfused_fwd"]) > 0 and math.isfinite(float(r["recompute"]))
            assert float(r["min_hbm_mb_fwd"]) < float(rows[0]["min_hbm_mb_fwd"])
    md = (tmp_path / "fused_mlp.md").read_text()
    for word in ("NOT speed figures", "torch", "triton", "git", "x unfused", "recompute"):
        assert word in md, word


def test_a_wrong_variant_is_refused_and_not_timed(tmp_path, monkeypatch):
    real = fused_mlp.fused_mlp

    def off_by_a_bit(fc1, fc2, x):
        return real(fc1, fc2, x) * 1.01

    monkeypatch.setattr(fused_mlp, "fused_mlp", off_by_a_bit)
    rc = fused_mlp.main(["--quick", "--out", str(tmp_path)], log=lambda *a: None)
    assert rc == 1
    rows = {(r["variant"], r["block"]): r for r in read_rows(tmp_path / "fused_mlp.csv")}
    for b in ("16", "32"):
        assert rows[("fused", b)]["status"] == "wrong" and rows[("fused", b)]["fwd_ms"] == ""
        assert "output" in rows[("fused", b)]["reason"]
        assert rows[("unfused", b)]["status"] == "ok"


def test_flop_model_counts_the_recomputed_hidden_blocks():
    # fc1 32 -> 64 (4 x 2 blocks, tall), fc2 64 -> 32 (2 x 4 blocks, wide), b = 16, T = 10.
    one = torch.tensor([0], dtype=I32)
    m = fused_mlp.flop_model(32, 64, 10, 16, one, one)
    # fc1 stores hidden blocks 0, 1; fc2 (offset 0) reads hidden blocks 0, 1: each once.
    assert m["recompute"] == 1.0
    assert m["fused"]["fwd"] == m["unfused"]["fwd"] == 2 * 10 * 2 * (2 * 16 * 16)
    # fc2 offset 2 reads hidden blocks 2, 3, where fc1 stores nothing: no fc1 work at all.
    m = fused_mlp.flop_model(32, 64, 10, 16, one, torch.tensor([2], dtype=I32))
    assert m["recompute"] == 0.0
    assert m["hbm_elems"]["fused"] == 10 * 64 and m["hbm_elems"]["dense"] == 10 * (64 + 4 * 64)


@pytest.mark.parametrize("b", [16, 32, 64])
def test_with_every_diagonal_each_hidden_block_is_recomputed_once_per_output_block(b):
    dim, hidden = 768, 3072
    m = fused_mlp.flop_model(dim, hidden, 1, b, torch.arange(hidden // b, dtype=I32),
                             torch.arange(hidden // b, dtype=I32))
    assert m["recompute"] == dim // b
    assert m["unfused"]["fwd"] == m["dense"]["fwd"]


@pytest.mark.parametrize("b", [16, 64])
def test_grouping_model_dedups_hidden_blocks_within_an_output_group(b):
    dim, hidden = 768, 3072
    g = torch.Generator().manual_seed(3)
    off1 = torch.randperm(hidden // b, generator=g)[:hidden // b // 10].to(I32)
    off2 = torch.randperm(hidden // b, generator=g)[:hidden // b // 10].to(I32)
    one = fused_mlp.grouping_model(dim, hidden, b, off1, off2, 1, 64)
    # one output block a program: nothing to share, the kernel's recompute (flop_model's)
    assert one["recompute"] == pytest.approx(fused_mlp.flop_model(dim, hidden, 1, b, off1, off2)["recompute"])
    every = fused_mlp.grouping_model(dim, hidden, b, off1, off2, dim // b, 64)
    # every output block in one program: each hidden block fc2 reads is computed once
    n1, _ = fused_mlp.block_counts(off1, hidden // b, dim // b)
    _, n2 = fused_mlp.block_counts(off2, dim // b, hidden // b)
    assert every["recompute"] == pytest.approx(float(n1[n2 > 0].sum()) / float(n1.sum()))
    assert every["recompute"] <= 1.0 < one["recompute"]
    assert every["acc_bytes"] == dim * 64 * 4 and every["x_tile_readers"] == 1
    recomputes = [fused_mlp.grouping_model(dim, hidden, b, off1, off2, nb, 64)["recompute"] for nb in (1, 2, 4, 8)]
    assert recomputes == sorted(recomputes, reverse=True)
