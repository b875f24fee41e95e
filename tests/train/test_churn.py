"""Mask churn: every mask update writes its per-layer kept / dropped / grown counts to
metrics.jsonl, DynaDiag writes its gate per stored diagonal while the gates are on, and
churn.png is drawn from those rows (the JSONL is the source of truth)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import torch

import kernels
from dst import DSTConfig, Sparsifier, make_layer
from train import plots

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _vit(tmp_path, *args):
    cmd = [sys.executable, "-m", "train.vit", "--preset", "micro", "--steps", "12", "--batch-size", "16",
           "--warmup", "2", "--eval-examples", "32", "--log-every", "3", "--threads", "1", "--no-progress",
           "--out-dir", str(tmp_path), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


def test_a_rigl_run_records_each_updates_counts_and_draws_churn_png(tmp_path):
    rows = _vit(tmp_path, "--method", "rigl", "--delta-t", "4")
    mask = [r for r in rows if r["split"] == "mask"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["step"] for r in mask] == [4, 8] and summary["mask_updates"] == len(mask)
    nnz = summary["density"]["nnz"]
    for r in mask:
        assert set(r["layers"]) == set(nnz)
        for name, c in r["layers"].items():
            # RigL keeps each layer's nnz: kept + dropped (before) = kept + grown (after) = nnz
            assert c["kept"] + c["dropped"] == c["kept"] + c["grown"] == nnz[name]
            assert c["dropped"] > 0
    assert not [r for r in rows if r["split"] == "gates"]
    assert (tmp_path / "churn.png").stat().st_size > 0


def test_a_dynadiag_run_records_gate_scores_until_the_freeze(tmp_path):
    rows = _vit(tmp_path, "--method", "dynadiag", "--delta-t", "3", "--freeze-at", "0.5")
    gates = [r for r in rows if r["split"] == "gates"]
    mask = [r for r in rows if r["split"] == "mask"]
    assert [r["step"] for r in mask] == [3, 6]           # one resample, then the freeze at step 6
    assert mask[-1]["layers"] and all(c["frozen"] for c in mask[-1]["layers"].values())
    assert [r["step"] for r in gates] == [2, 3, 5]       # log steps (every 3) and the resample, before the freeze
    for r in gates:
        for g in r["layers"].values():
            assert len(g["offsets"]) == len(g["scores"]) > g["k"] >= 1 and 0 <= min(g["offsets"]) <= max(g["offsets"]) < g["P"]
            assert g["offsets"] == sorted(set(g["offsets"])) and all(0 <= a <= 1 for a in plots.gate_values(g))
    # the gates train: scores move away from their start at 0
    assert any(max(abs(v) for v in g["scores"]) > 0 for g in gates[-1]["layers"].values())
    assert (tmp_path / "churn.png").stat().st_size > 0


def test_mask_rows_take_the_sparsifiers_stats_and_the_live_gates():
    cfg = DSTConfig.for_method("dynadiag", sparsity=0.75, delta_t=2, freeze_at=0.9)
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(make_layer(cfg, 16, 32, 0.25, generator=gen))
    sp = Sparsifier(model, cfg, total_steps=10)
    layer = model[0]
    with torch.no_grad():
        layer.scores.copy_(torch.arange(layer.num_diagonals, dtype=torch.float32))
    assert plots.mask_rows(1, None, sp, log=False) == []
    (row,) = plots.mask_rows(1, None, sp, log=True)
    g = row["layers"]["0"]
    assert row["split"] == "gates" and g["offsets"] == layer.offsets.tolist()
    assert g["scores"] == [float(i) for i in range(layer.num_diagonals)]
    layer.temperature.fill_(0.7)
    (row,) = plots.mask_rows(1, None, sp, log=True)
    assert torch.allclose(torch.tensor(plots.gate_values(row["layers"]["0"]), dtype=torch.float64),
                          layer.gate().double(), atol=1e-6)
    stats = {"step": 2, "drop_fraction": 0.25, "seconds": 0.01,
             "layers": {"0": {"kept": 7, "dropped": 1, "grown": 1, "density": 0.5, "replaced": 1}}}
    mask, gates = plots.mask_rows(2, stats, sp, log=False)
    assert mask == {"step": 2, "split": "mask", "drop_fraction": 0.25, "seconds": 0.01, "layers": stats["layers"]}
    assert gates["split"] == "gates"


def test_churn_png_is_drawn_from_the_jsonl_rows(tmp_path, monkeypatch):
    rows = [{"step": 0, "split": "train", "loss": 1.0},
            {"step": 4, "split": "mask", "drop_fraction": 0.3, "seconds": 0.0,
             "layers": {"a": {"kept": 6, "dropped": 4, "grown": 4}, "b": {"kept": 9, "dropped": 1, "grown": 1}}},
            {"step": 8, "split": "mask", "drop_fraction": 0.1, "seconds": 0.0,
             "layers": {"a": {"kept": 8, "dropped": 2, "grown": 3}}},
            {"step": 2, "split": "gates", "layers": {"a": {"P": 5, "k": 1, "temperature": 1.0, "offsets": [1, 3],
                                                            "scores": [0.0, 0.0]}}},        # gates 0.5, 0.5
            {"step": 5, "split": "gates", "layers": {"a": {"P": 5, "k": 1, "temperature": 1.0, "offsets": [0, 3],
                                                            "scores": [0.0, math.log(3)]}}}]  # gates 0.25, 0.75
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []
    real = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", lambda ax, img, **kw: seen.append(img) or real(ax, img, **kw))
    assert plots.plot_churn(path, tmp_path / "churn.png", "t")
    dropped, grown, gate = seen
    assert dropped[0] == [0.4, 0.2] and dropped[1][0] == 0.1 and math.isnan(dropped[1][1])
    assert grown[0] == [0.4, 0.3]
    # [offset][row]: offset 1 stored only at step 2, offset 0 only at step 5, 3 at both
    assert len(gate) == 5 and math.isclose(gate[0][1], 0.25) and gate[1][0] == 0.5
    assert gate[3][0] == 0.5 and math.isclose(gate[3][1], 0.75)
    assert all(map(math.isnan, [gate[0][0], gate[1][1]] + gate[2] + gate[4]))
    assert (tmp_path / "churn.png").stat().st_size > 0
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(rows[0]) + "\n")
    assert not plots.plot_churn(empty, tmp_path / "none.png", "t") and not (tmp_path / "none.png").exists()
