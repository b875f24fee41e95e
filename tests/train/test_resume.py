"""A real training process killed mid-run (SIGTERM) saves a checkpoint, exits 143, and a
--resume run reproduces the uninterrupted run's losses, masks and values exactly (CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from train import vit

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--method", "rigl", "--preset", "micro", "--steps", "60", "--warmup", "5", "--batch-size", "64",
        "--log-every", "5", "--eval-every", "20", "--eval-examples", "500", "--ckpt-every", "0",
        "--delta-t", "10", "--threads", "1", "--no-progress", "--no-plots"]


def train_rows(path):
    return [json.loads(line) for line in open(path) if '"train"' in line]


def test_a_killed_process_resumes_to_the_same_run(tmp_path):
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "train.vit", *ARGS, "--out-dir", str(cut)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = cut / "metrics.jsonl"
        if metrics.exists() and any(r["step"] >= 14 for r in train_rows(metrics)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped_at = torch.load(cut / "checkpoint.pt", weights_only=False)["step"]
    assert 15 <= stopped_at < 60 and f"at step {stopped_at}" in err
    assert vit.main(ARGS + ["--out-dir", str(cut), "--resume"]) == 0
    assert vit.main(ARGS + ["--out-dir", str(tmp_path / "whole")]) == 0
    assert train_rows(cut / "metrics.jsonl") == train_rows(tmp_path / "whole" / "metrics.jsonl")
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    b = torch.load(cut / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])   # values, rows, cols
    assert a["history"]["mask_updates"] == b["history"]["mask_updates"] == 4   # steps 10, 20, 30, 40 (t_end 0.75)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())["step_time_ms"]["steps_timed"]
    assert json.loads((cut / "summary.json").read_text())["step_time_ms"]["steps_timed"] == whole == 55   # both sessions


def test_resuming_a_finished_run_leaves_its_files_alone(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.vit", *ARGS, "--steps", "8", "--out-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert json.loads(before["summary.json"])["step_time_ms"]["median"] > 0
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already finished its 8 steps" in done.stdout, done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
