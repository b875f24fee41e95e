"""--tensorboard: every row of metrics.jsonl mirrored into TensorBoard event files (the JSONL
stays the source), and without the tensorboard package a one-line error naming the flag and
the install command before anything loads or is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import tracking

ROOT = Path(__file__).resolve().parents[2]


def _env(*front):
    path = os.pathsep.join([*map(str, front), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")


def _vit(out, *args, env):
    cmd = [sys.executable, "-m", "train.vit", "--preset", "micro", "--steps", "8", "--batch-size", "16", "--warmup", "2",
           "--eval-examples", "32", "--log-every", "2", "--threads", "1", "--no-progress", "--no-plots",
           "--out-dir", str(out), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_tensorboard_the_flag_fails_at_once_naming_the_install(tmp_path):
    # a tensorboard that cannot be imported, first on the path, whether or not the real one is installed
    (tmp_path / "shadow" / "tensorboard").mkdir(parents=True)
    (tmp_path / "shadow" / "tensorboard" / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    done = _vit(tmp_path / "run", "--method", "rigl", "--tensorboard", env=_env(tmp_path / "shadow"))
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "--tensorboard" in line and 'pip install -e ".[tensorboard]"' in line, done.stderr
    assert not (tmp_path / "run").exists()


def test_the_event_files_mirror_every_jsonl_row(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    done = _vit(tmp_path / "run", "--method", "dynadiag", "--delta-t", "2", "--freeze-at", "0.5", "--tensorboard",
                env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    expected, hist = {}, {}
    for r in rows:
        scalars, histograms = tracking.flatten(r, r["split"])
        for tag, v in scalars.items():
            expected.setdefault(tag, []).append((r["step"], v))
        for tag, v in histograms.items():
            hist.setdefault(tag, []).append((r["step"], len(v), sum(v)))
    assert {"train/loss", "val/accuracy", "test/accuracy"} <= set(expected)
    assert any(t.startswith("mask/") and t.endswith("/grown") for t in expected)
    assert any(t.startswith("gates/") and t.endswith("/scores") for t in hist)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, want in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert all(abs(g - w) <= 1e-6 * max(1.0, abs(w)) for (_, g), (_, w) in zip(got, want)), tag  # float32 events
    assert set(events.Tags()["histograms"]) == set(hist)
    for tag, want in hist.items():
        got = [(e.step, e.histogram_value.num, e.histogram_value.sum) for e in events.Histograms(tag)]
        assert [(s, n) for s, n, _ in got] == [(s, n) for s, n, _ in want], tag
        assert all(abs(g - w) <= 1e-6 * max(1.0, abs(w)) for (_, _, g), (_, _, w) in zip(got, want)), tag


def test_flatten_names_numbers_by_path_and_skips_indices_and_text():
    row = {"step": 3, "split": "mask", "seconds": 0.5, "note": "x",
           "layers": {"fc": {"kept": 7, "frozen": True}}, "offsets": [1, 2], "gate": [0.5, 1]}
    assert tracking.flatten(row, "mask") == ({"mask/seconds": 0.5, "mask/layers/fc/kept": 7.0,
                                              "mask/layers/fc/frozen": 1.0}, {"mask/gate": [0.5, 1.0]})


def test_a_resumed_mirror_purges_the_steps_it_writes_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class Rows:   # what train.common.Metrics offers the mirror
        def __init__(self):
            self.rows = []

        def write(self, **row):
            self.rows.append(row)

        def close(self):
            pass

    first = tracking.mirror(Rows(), tmp_path, True)
    for step in range(6):
        first.write(step=step, split="train", loss=float(step))
    first.close()
    resumed = tracking.mirror(Rows(), tmp_path, True, start_step=3)   # the checkpoint was at step 3
    for step in range(3, 5):
        resumed.write(step=step, split="train", loss=10.0 + step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
    assert tracking.mirror(first.metrics, tmp_path, False) is first.metrics
