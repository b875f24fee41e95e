"""train/table.py counts each run once: torchrun's rank copies and overlapping folders are not
extra seeds."""
import json

from train import table


def _summary(folder, seed, acc):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "entry": "vit", "method": "rigl", "sparsity": 0.9, "test": {"accuracy": acc}, "steps": 10,
        "density": {"overall": 0.1}, "step_time_ms": {"median": 5.0}, "config": {"seed": seed},
        "command": f"python -m train.vit --seed {seed}"}))


def test_a_torchrun_rank_copy_and_a_folder_given_twice_count_once(tmp_path, capsys):
    _summary(tmp_path / "runs" / "rigl-0", 0, 0.9)
    _summary(tmp_path / "runs" / "rigl-0" / "rank1", 0, 0.9)   # what rank 1 of torchrun writes
    _summary(tmp_path / "runs" / "rigl-1", 1, 0.8)
    _summary(tmp_path / "runs" / "rank1", 2, 0.7)              # a run folder that happens to be named rank1
    assert table.main([str(tmp_path / "runs"), str(tmp_path / "runs" / "rigl-1"), "--json", str(tmp_path / "t.json")]) == 0
    assert "| rigl | 0.9 | 80.00 ± 10.00 | 0.100 | 5 | 3 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())[0]["seeds"] == [0, 1, 2]
