"""bench/sweep.py: the quick pipeline runs on CPU, the gate rejects wrong configs before they
are timed, the table is written and read back, and the kernels pick up a tuned config."""
import json
import math
import subprocess
import sys

import pytest
import torch

import kernels  # before triton: it switches the interpreter on where there is no GPU
import triton
from bench import common, sweep
from kernels import runtime as rt

from .conftest import ROOT, read_rows

KERNELS = {"fanin_fwd", "fanin_dx", "diag_fwd", "diag_dx", "sddmm", "sddmm_block", "fused_diag_mlp"}


def _parse_key(key: str) -> dict:
    return dict(item.split("=", 1) for item in key.split(","))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python bench/sweep.py --quick`` exactly as a user runs it, in a fresh process."""
    out = tmp_path_factory.mktemp("quick")
    proc = subprocess.run([sys.executable, "bench/sweep.py", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return out, proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick is the CPU interpreter check")
def test_quick_sweep_writes_every_output_and_says_timings_are_not_speed_figures(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT speed figures" in proc.stdout
    for name in ("sweep.csv", "candidates.csv", "tuning.csv", "sweep.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "sweep.md").read_text()
    assert "NOT speed figures" in md and "torch" in md and "triton" in md and "git" in md
    rows = read_rows(out / "sweep.csv")
    assert {r["op"] for r in rows} == set(sweep.OPS)
    assert all(r["status"] == "timed" and r["config_source"] == "table" for r in rows)
    assert all(r["mode"] == "interpreter" for r in rows)
    assert any(r["surv_ms"] for r in rows if r["op"].startswith("fanin"))
    # few candidates a key (2 in --quick): each one's time is in the log, as the side-by-side
    # phase of bench/gpu_check.sh reads them
    cands = read_rows(out / "candidates.csv")
    timed = [r for r in cands if r["status"] == "timed"]
    assert timed and sum(" ms" in line and ": " in line and line.startswith("  {") for line in
                         proc.stdout.splitlines()) == len(timed), proc.stdout[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick is the CPU interpreter check")
def test_quick_sweep_times_the_fused_mlp_beside_dense_and_unfused_only_at_the_mlp_shape(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in read_rows(out / "sweep.csv") if r["op"] == "mlp_fwd"]
    assert rows and {(r["in_features"], r["out_features"]) for r in rows} == {("64", "128")}
    assert {int(r["block"]) for r in rows} == {16}  # b = 1 has no fused kernel
    for r in rows:
        assert r["kernel"] == "fused_diag_mlp" and r["status"] == "timed" and r["reason"] == ""
        assert float(r["gate_err"]) <= float(r["gate_bound"])
        assert float(r["dense_ms"]) > 0 and float(r["unfused_ms"]) > 0 and float(r["x_unfused"]) > 0
        assert r["csr_ms"] == "" and r["surv_ms"] == ""
    md = (out / "sweep.md").read_text()
    assert "fused MLP fwd, T=256x197 (b>=16)" in md and "x unfused" in md


def test_mlp_cases_are_built_for_the_mlp_shapes_and_blocks_of_16_or_more_only():
    args = sweep.parse_args(["--full"])
    cases = sweep.build_cases(args, args.sparsities, args.ablations)
    mlp = [c for c in cases if c.op == "mlp_fwd"]
    assert {(c.in_features, c.out_features) for c in mlp} == {(768, 3072)}
    assert {c.block for c in mlp} == {16, 32, 64}
    assert {(c.in_features, c.out_features) for c in cases if c.op == "diag_fwd"} == {
        (768, 3072), (3072, 768), (768, 2304)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="--quick is the CPU interpreter check")
def test_quick_sweep_table_is_written_and_reads_back_through_launch_config(quick_run, monkeypatch):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((out / "configs" / "interpreter.json").read_text())
    assert KERNELS <= set(table)
    assert "git" in table["_meta"] and "written_by" in table["_meta"]
    monkeypatch.setattr(rt, "CONFIG_DIR", out / "configs")
    for kernel in KERNELS:
        for key, cfg in table[kernel].items():
            assert rt.launch_config(kernel, _parse_key(key), {"unrelated": 1}) == {"unrelated": 1, **cfg}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bare run's CPU default")
def test_a_bare_run_without_a_gpu_is_the_quick_check_and_full_asks_for_the_grid(tmp_path, capsys):
    bare, full = sweep.parse_args([]), sweep.parse_args(["--full"])
    quick = sweep.parse_args(["--quick"])
    assert bare.quick and bare.cpu_default and not quick.cpu_default
    assert (bare.tokens, bare.shapes, bare.out) == (quick.tokens, quick.shapes, quick.out)
    assert not full.quick and full.tokens != quick.tokens and full.table_dir == common.ROOT / "kernels" / "configs"
    with pytest.raises(SystemExit):
        sweep.parse_args(["--quick", "--full"])
    assert "exclude each other" in capsys.readouterr().err


def test_merging_a_table_keeps_the_entries_it_does_not_touch(tmp_path):
    path = common.table_path(tmp_path, "somegpu")
    common.merge_table(path, {"fanin_fwd": {"T=1,dtype=float16": {"BLOCK_T": 16}}}, {"git": "a"})
    common.merge_table(path, {"fanin_fwd": {"T=256,dtype=float16": {"BLOCK_T": 32}},
                              "sddmm": {"dtype=float16": {"BLOCK_N": 64}}}, {"git": "b"})
    table = common.read_table(path)
    assert table["fanin_fwd"] == {"T=1,dtype=float16": {"BLOCK_T": 16}, "T=256,dtype=float16": {"BLOCK_T": 32}}
    assert table["sddmm"] == {"dtype=float16": {"BLOCK_N": 64}}
    assert table["_meta"] == {"git": "b"}


def test_gate_accepts_a_correct_output_and_rejects_wrong_nan_and_misshapen_ones():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(8, 5, generator=g, dtype=torch.float64)
    lowp = truth.to(torch.bfloat16)
    ok, *_ = common.gate(truth.to(torch.bfloat16), truth, lowp)
    assert ok
    wrong = truth.clone()
    wrong[3, 2] += 0.5
    assert not common.gate(wrong.to(torch.bfloat16), truth, lowp)[0]
    unwritten = truth.to(torch.bfloat16)
    unwritten[-1] = math.nan
    ok, _, _, reason = common.gate(unwritten, truth, lowp)
    assert not ok and "non-finite" in reason
    ok, _, _, reason = common.gate(truth[:4].to(torch.bfloat16), truth, lowp)
    assert not ok and "shape" in reason


class _PlantedBugs:
    """Stands in for a @triton.jit kernel and plants launch bugs tied to configs that the kernel
    itself would run correctly. ``plant(args, grid, kwargs)`` returns the arguments and grid to
    launch with and whether it changed them; a changed launch made while timing is recorded in
    ``timed_bad`` (the gate must keep that empty)."""

    def __init__(self, real, timing, plant):
        self.real, self.timing, self.plant, self.timed_bad = real, timing, plant, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            args, grid_, bad = self.plant(list(args), grid, kwargs)
            if bad and self.timing["on"]:
                self.timed_bad.append(dict(kwargs))
            return self.real[grid_](*args, **kwargs)
        return launch


def _fanin_bugs(args, grid, kwargs):
    """BLOCK_R=32 drops the last nonzero of every row (K - 1, a loop-bound bug), BLOCK_R=16
    launches one program too few along the grid's first axis (an output tile left unwritten)."""
    if kwargs["BLOCK_R"] == 32:
        args[7] = args[7] - 1  # K
    if kwargs["BLOCK_R"] == 16:
        grid = (grid[0] - 1,) + tuple(grid[1:])
    return args, grid, kwargs["BLOCK_R"] in (16, 32)


def _flag_timing(monkeypatch, timing):
    """``timing["on"]`` is True exactly while common.bench_ms times a call."""
    real_bench = common.bench_ms

    def spying_bench(fn, **kw):
        timing["on"] = True
        try:
            return real_bench(fn, **kw)
        finally:
            timing["on"] = False

    monkeypatch.setattr(common, "bench_ms", spying_bench)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the planted bugs are sized for the quick grid")
def _sweep_with_planted_bugs(tmp_path, monkeypatch, module, kernel, plant, bad, argv):
    """Run the sweep with ``module.kernel`` replaced by a _PlantedBugs and the ``bad`` configs
    added as candidates: (candidates.csv rows, the _PlantedBugs, the written config table)."""
    timing = {"on": False}
    buggy = _PlantedBugs(getattr(module, kernel), timing, plant)
    monkeypatch.setattr(module, kernel, buggy)
    _flag_timing(monkeypatch, timing)
    argv = argv + ["--out", str(tmp_path)]
    for b in bad:
        argv += ["--extra-candidate", b]
    assert sweep.main(argv, log=lambda *a: None) == 0
    table = json.loads((tmp_path / "configs" / "interpreter.json").read_text())
    return read_rows(tmp_path / "candidates.csv"), buggy, table


def test_gate_rejects_injected_wrong_configs_and_never_times_them(tmp_path, monkeypatch):
    bad = ['fanin_fwd={"BLOCK_R": 32}', 'fanin_fwd={"BLOCK_R": 16}', 'fanin_fwd={"BLOCK_T": 48}']
    cands, buggy, table = _sweep_with_planted_bugs(
        tmp_path, monkeypatch, kernels.fanin, "fanin_fwd_kernel", _fanin_bugs, bad,
        ["--quick", "--ops", "fanin_fwd", "--tokens", "40", "--sparsities", "0.9"])
    by_cfg = {}
    for r in cands:
        by_cfg.setdefault(r["config"], []).append(r)
    reasons = {}
    for cfg, rows in by_cfg.items():
        c = json.loads(cfg)
        if c["BLOCK_R"] in (16, 32) or c["BLOCK_T"] == 48:
            assert all(r["status"] == "rejected" and r["ms"] == "" for r in rows), rows
            reasons[(c["BLOCK_R"], c["BLOCK_T"])] = rows[0]["reason"]
        else:
            assert all(r["status"] == "timed" and float(r["ms"]) > 0 for r in rows), rows
    assert len(reasons) == 3
    assert any(k[0] == 32 and "max error" in v for k, v in reasons.items())      # wrong values
    assert any(k[0] == 16 and "non-finite" in v for k, v in reasons.items())     # unwritten rows
    assert any(k[1] == 48 and v.startswith("error:") for k, v in reasons.items())  # does not compile
    assert buggy.timed_bad == []
    for cfg in table["fanin_fwd"].values():
        assert cfg["BLOCK_R"] not in (16, 32) and cfg["BLOCK_T"] != 48
    assert "Rejected by the gate" in (tmp_path / "sweep.md").read_text()


def _fused_bugs(args, grid, kwargs):
    """num_warps=2 reads x with a row stride one short (wrong values), BLOCK_T=16 launches one
    program too few (an output tile left unwritten)."""
    if kwargs["num_warps"] == 2:
        args[12] = args[12] - 1  # x2.stride(0)
    if kwargs["BLOCK_T"] == 16:
        grid = (grid[0] - 1,)
    return args, grid, kwargs["num_warps"] == 2 or kwargs["BLOCK_T"] == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="the planted bugs are sized for the quick grid")
def test_gate_rejects_wrong_fused_mlp_configs_and_never_times_them(tmp_path, monkeypatch):
    bad = ['fused_diag_mlp={"num_warps": 2}', 'fused_diag_mlp={"BLOCK_T": 16}', 'fused_diag_mlp={"BLOCK_T": 8}']
    cands, buggy, table = _sweep_with_planted_bugs(
        tmp_path, monkeypatch, kernels.fused, "fused_diag_mlp_kernel", _fused_bugs, bad,
        ["--quick", "--ops", "mlp_fwd", "--tokens", "40", "--sparsities", "0.75", "--tune-sparsities", "0.75"])
    reasons = {}
    for r in cands:
        c = json.loads(r["config"])
        if c["num_warps"] == 2 or c["BLOCK_T"] in (8, 16):
            assert r["status"] == "rejected" and r["ms"] == "", r
            reasons[(c["num_warps"], c["BLOCK_T"])] = r["reason"]
        else:
            assert r["status"] == "timed" and float(r["ms"]) > 0, r
    assert len(reasons) == 3
    assert "max error" in reasons[(2, 64)]                  # fc2's last diagonal skipped
    assert "non-finite" in reasons[(4, 16)]                 # an unwritten output tile
    assert reasons[(4, 8)].startswith("error: ValueError")  # the launcher refuses BLOCK_T < 16
    assert buggy.timed_bad == []
    for cfg in table["fused_diag_mlp"].values():
        assert cfg["num_warps"] != 2 and cfg["BLOCK_T"] not in (8, 16)
    rows = read_rows(tmp_path / "sweep.csv")
    assert len(rows) == 1 and rows[0]["status"] == "timed" and float(rows[0]["unfused_ms"]) > 0


def test_a_wrong_unfused_baseline_is_rejected_not_timed_and_fails_the_run(tmp_path, monkeypatch):
    real_diag_fwd = kernels.diag_fwd
    monkeypatch.setattr(kernels, "diag_fwd", lambda *a, **kw: real_diag_fwd(*a, **kw) * 1.5)
    timed = []
    real_bench = common.bench_ms
    monkeypatch.setattr(common, "bench_ms", lambda fn, **kw: timed.append(fn) or real_bench(fn, **kw))
    argv = ["--quick", "--ops", "mlp_fwd", "--tokens", "40", "--sparsities", "0.9", "--no-tune",
            "--out", str(tmp_path)]
    assert sweep.main(argv, log=lambda *a: None) == 1
    (row,) = read_rows(tmp_path / "sweep.csv")
    assert row["status"] == "timed" and float(row["dense_ms"]) > 0  # the fused kernel itself is right
    assert row["unfused_ms"] == "" and row["reason"].startswith("unfused baseline rejected: max error")
    assert len(timed) == 2  # the kernel and dense, never the wrong baseline


def test_kernels_pick_up_a_tuned_config_from_the_table(tmp_path, monkeypatch):
    T, n_in, n_out = 40, 64, 96
    dtype_name = "float32"
    key = {"T": rt.shape_bucket(T), "dtype": dtype_name}
    tuned = {"BLOCK_T": 16, "BLOCK_R": 32, "num_warps": 2}
    common.merge_table(common.table_path(tmp_path), {"fanin_fwd": {rt.format_key(key): tuned}}, {})
    monkeypatch.setattr(rt, "CONFIG_DIR", tmp_path)
    assert rt.launch_config("fanin_fwd", key, {"BLOCK_T": 64, "BLOCK_R": 64, "num_warps": 4}) == tuned

    real = kernels.fanin.fanin_fwd_kernel
    seen = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append((grid, kwargs))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels.fanin, "fanin_fwd_kernel", Spy())
    torch.manual_seed(0)
    layer = kernels.FanInLinear(n_in, n_out, density=0.1)
    x = torch.randn(T, n_in)
    with kernels.use_backend("triton"), torch.no_grad():
        y = layer(x)  # the public layer -> custom op -> launcher -> table lookup
    assert len(seen) == 1
    grid, kw = seen[0]
    assert (kw["BLOCK_T"], kw["BLOCK_R"], kw["num_warps"]) == (16, 32, 2)
    assert math.prod(grid) == triton.cdiv(T, 16) * triton.cdiv(n_out, 32)  # programs of the tuned tiles
    ref = x.double() @ layer.to_dense().double().t() + layer.bias.double()
    assert torch.allclose(y.double(), ref, atol=1e-5)


def _fake_row(op, T, block, x_dense, kernel_ms=1.0, n_in=768, n_out=3072, x_csr="", ablation=0, x_unfused=""):
    return {"op": op, "in_features": str(n_in), "out_features": str(n_out), "tokens": str(T), "sparsity": "0.9",
            "block": str(block), "dtype": "bfloat16", "ablation": str(ablation), "kernel_ms": str(kernel_ms),
            "dense_ms": str(kernel_ms * x_dense), "csr_ms": "", "surv_ms": "", "x_dense": str(x_dense),
            "x_csr": str(x_csr), "x_surv": "", "x_unfused": str(x_unfused),
            "unfused_ms": str(kernel_ms * x_unfused) if x_unfused != "" else "", "status": "timed"}


def test_gpu_report_sums_training_products_and_judges_the_targets(tmp_path):
    """The report logic a GPU run relies on, fed with made-up GPU rows."""
    rows = [_fake_row("diag_fwd", 50432, 16, 2.2, kernel_ms=1.0),
            _fake_row("diag_dx", 50432, 16, 2.0, kernel_ms=1.0),
            _fake_row("diag_dw", 50432, 16, 1.0, kernel_ms=2.0),
            _fake_row("fanin_fwd", 256, 1, 1.5, n_in=3072, n_out=768, x_csr=14.0),
            _fake_row("fanin_fwd", 256, 1, 9.0, n_in=3072, n_out=768, x_csr=99.0, ablation=0.3),
            _fake_row("mlp_fwd", 50432, 16, 1.5, x_unfused=0.8),
            _fake_row("mlp_fwd", 50432, 64, 2.5, x_unfused=1.6),
            _fake_row("mlp_fwd", 4096, 64, 9.0, x_unfused=9.0)]  # not the target's T
    train = sweep.training_rows(rows)
    assert len(train) == 1
    # kernel 1 + 1 + 2 = 4 ms; dense 2.2 + 2.0 + 2.0 = 6.2 ms
    assert train[0]["kernel_ms"] == pytest.approx(4.0) and train[0]["x_dense"] == pytest.approx(6.2 / 4.0)
    assert all(t["format"] != "mlp" for t in train)  # a forward only: no training product
    verdict = {t["target"]: t for t in sweep.targets(rows, train)}
    assert verdict["diag/block fwd, T=256x197"]["met"] == "yes"
    assert verdict["diag/block fwd+bwd, T=256x197"]["met"].startswith("no (86%")
    assert verdict["fan-in 3072->768, batch 256"]["met"].startswith("no (88%")  # the ablated row is not counted
    assert verdict["fan-in 3072->768, batch 256 vs CSR"]["met"] == "yes"
    assert verdict["online inference (T=1), diag vs CSR"]["met"] == "-"
    fused = verdict["fused MLP fwd, T=256x197 (b>=16)"]
    assert fused["met"] == "yes" and fused["measured"] == pytest.approx(2.5) and "b=64" in fused["where"]
    assert verdict["fused MLP fwd vs unfused, T=256x197 (b>=16)"]["measured"] == pytest.approx(1.6)
    interp = {t["target"]: t for t in sweep.targets(rows, train, interp=True)}
    assert interp["diag/block fwd, T=256x197"]["met"].startswith("n/a")
    sweep.plot(rows, tmp_path / "speedup.png", interp=False)
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_the_full_space_tries_the_mlp_forward_unfused_once():
    """UNFUSED swaps the fused kernel for the two block-diagonal products, whose tiles are their
    own: one candidate with it flipped, the default's other keys unchanged."""
    from bench.ops import candidate_space
    default = {"BLOCK_T": 128, "num_warps": 4, "num_stages": 2, "UNFUSED": False}
    space = candidate_space(default, 50432, 16, quick=False)
    assert space[0] == default
    flipped = [c for c in space if c["UNFUSED"]]
    assert flipped == [dict(default, UNFUSED=True)], flipped
    assert len(space) > 10  # the fused kernel's tiles, warps and stages are still swept


def test_the_full_space_tries_each_band_count_of_the_weight_gradient_once():
    from bench.ops import candidate_space
    default = {"G": 4, "BLOCK_T": 128, "num_warps": 4, "num_stages": 3, "BANDS": 128, "band_warps": 16}
    space = candidate_space(default, 50432, 16, quick=False)
    others = [(c["BANDS"], c["band_warps"]) for c in space if c["BANDS"] != 128]
    assert sorted(others) == [(0, 16), (64, 8)], others
    assert all(c == dict(default, BANDS=c["BANDS"], band_warps=c["band_warps"]) for c in space if c["BANDS"] != 128)
