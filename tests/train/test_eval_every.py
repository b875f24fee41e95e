"""--eval-every 0 (the default) validates every steps // 10 steps: ten points on a run's curve
whatever its length."""
import json

from train import vit

FAST = ["--preset", "micro", "--batch-size", "32", "--warmup", "2", "--eval-examples", "64", "--no-progress",
        "--no-plots", "--method", "rigl", "--delta-t", "5"]


def test_the_default_validates_ten_times_a_run(tmp_path, tiny_mnist):
    assert vit.main(FAST + ["--steps", "30", "--out-dir", str(tmp_path / "a")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "val"] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert vit.main(FAST + ["--steps", "30", "--eval-every", "20", "--out-dir", str(tmp_path / "b")]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["split"] == "val"] == [20, 30]
