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


def _dst_summary(folder, method, seed, acc, **dst):
    from dst import DSTConfig
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "entry": "vit", "method": method, "sparsity": 0.9, "test": {"accuracy": acc}, "steps": 10,
        "density": {"overall": 0.1}, "step_time_ms": {"median": 5.0},
        "config": {"seed": seed, "dst": {**DSTConfig.for_method(method, seed=seed).to_dict(), **dst}},
        "command": f"python -m train.vit --method {method} --seed {seed}"}))


def test_only_settings_the_method_reads_split_its_rows(tmp_path, capsys):
    # rigl runs recorded before DynaDiag's freeze default changed; a common --delta-t that the
    # dense run does not read; one dynadiag run with the other freeze.
    _dst_summary(tmp_path / "rigl-0", "rigl", 0, 0.9, freeze_gate="fold", delta_t=50)
    _dst_summary(tmp_path / "rigl-1", "rigl", 1, 0.8, delta_t=50)
    _dst_summary(tmp_path / "dense-0", "dense", 0, 0.95)
    _dst_summary(tmp_path / "dd-0", "dynadiag", 0, 0.85, delta_t=50)
    _dst_summary(tmp_path / "dd-fold-0", "dynadiag", 0, 0.84, delta_t=50, freeze_gate="fold")
    assert table.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| rigl | 0.9 | 85.00 ± 7.07 | 0.100 | 5 | 2 |" in out
    assert "| dense | 0 | 95.00 |" in out and "| dynadiag | 0.9 | 85.00 |" in out
    assert "| dynadiag (freeze_gate=fold) | 0.9 | 84.00 |" in out
