"""Bad input to the entry points: one line on stderr, exit code 2, nothing written."""
import dataclasses
import json

import pytest
import torch

from dst import DSTConfig
from train import bert, common, flags, gpt, vit

BASE = ["--preset", "micro", "--steps", "4", "--no-progress", "--no-plots"]


@pytest.mark.parametrize("flags, message", [
    (["--method", "magic"], "unknown method 'magic'"),
    (["--sparsity", "1.5"], "sparsity must lie in [0.0, 1.0)"),
    (["--delta-t", "0"], "delta_t must be an int >= 1"),
    (["--distribution", "zipf"], "distribution must be one of"),
    (["--steps", "ten"], "invalid int value: 'ten'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        vit.main(BASE + ["--out-dir", str(tmp_path / "run")] + flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--preset", "huge"], "unknown ViT preset 'huge'"),
    (["--patch-size", "5"], "--patch-size 5 must divide the image size 28"),
    (["--heads", "3"], "heads=3 must divide dim=32"),
    (["--patch-size", "0"], "--patch-size must be >= 1, got 0"),
    (["--depth", "-1"], "depth must be an int >= 1, got -1"),
    (["--optimizer", "adam"], "--optimizer must be adamw or sgd"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--precision", "fp8"], "--precision must be auto, bf16 or fp32"),
    (["--resume"], "--resume: no checkpoint"),
    (["--dataset", "no-such-user/no-such-dataset"], "cannot load dataset 'no-such-user/no-such-dataset'"),
    (["--dataset", "/no/such/images.parquet"], "does not exist"),
    (["--method", "dynadiag", "--block-size", "3"], "--block-size 3 must divide"),
    (["--method", "rigl", "--fused-mlp"], "--fused-mlp needs --method dynadiag"),
    (["--method", "dynadiag", "--block-size", "1", "--fused-mlp"], "--fused-mlp needs --block-size >= 16"),
    (["--method", "dynadiag", "--block-size", "16", "--dropout", "0.1", "--fused-mlp"],
     "--fused-mlp needs --dropout 0"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(flags, message, tmp_path, capsys, tiny_mnist_unless_dataset):
    out = tmp_path / "run"
    assert vit.main(BASE + ["--out-dir", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


@pytest.fixture
def tiny_mnist_unless_dataset(request, monkeypatch, small_mnist):
    """Small MNIST for the flag tests, except where --dataset itself is under test."""
    if "--dataset" not in request.node.callspec.params["flags"]:
        monkeypatch.setattr("train.vit.load_images", lambda spec, data_dir="", seed=0, **kw: small_mnist)


def test_an_existing_run_is_not_overwritten_without_overwrite(tmp_path, capsys, tiny_mnist):
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert vit.main(BASE + ["--out-dir", str(out)]) == 2
    assert "already holds a run (summary.json); pass --resume or --overwrite" in capsys.readouterr().err
    assert (out / "summary.json").read_text() == "{}"


def test_a_corrupt_or_foreign_checkpoint_is_refused_and_left_alone(tmp_path, capsys, tiny_mnist):
    out = tmp_path / "run"
    assert vit.main(BASE + ["--method", "set", "--out-dir", str(out)]) == 0
    good = (out / "checkpoint.pt").read_bytes()
    assert vit.main(BASE + ["--method", "rigl", "--out-dir", str(out), "--resume"]) == 2
    assert "has dst={'method': 'set'" in capsys.readouterr().err
    (out / "checkpoint.pt").write_bytes(good[: len(good) // 2])
    assert vit.main(BASE + ["--method", "set", "--out-dir", str(out), "--resume"]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == good[: len(good) // 2]
    (out / "checkpoint.pt").write_bytes(good)
    assert bert.main(["--preset", "micro", "--out-dir", str(out), "--resume", "--method", "set"]) == 2
    assert "written by train.vit, not train.bert" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--preset", "giant"], "unknown BERT preset 'giant'"),
    (["--vocab-size", "3"], "--vocab-size must be >= 31"),
    (["--seq-len", "4"], "--seq-len must be >= 8"),
    (["--dataset", "/no/such/corpus.txt"], "does not exist"),
    (["--mask-prob", "0"], "--mask-prob in (0, 1)"),
    (["--heads", "0"], "heads must be an int >= 1, got 0"),
    (["--method", "dynadiag", "--block-size", "16", "--fused-mlp"], "--fused-mlp needs --dropout 0 "),
    (["--method", "srigl", "--dropout", "0", "--fused-mlp"], "--fused-mlp needs --method dynadiag"),
])
def test_bert_bad_input_exits_2_with_one_line_and_writes_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert bert.main(BASE + ["--out-dir", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_every_config_field_is_a_commented_flag_and_dst_flags_take_paper_defaults():
    for cls in (vit.Config, bert.Config, gpt.Config):
        comments = common.field_comments(cls)
        assert all(comments.get(f.name) for f in dataclasses.fields(cls)), [f.name for f in dataclasses.fields(cls)
                                                                             if not comments.get(f.name)]
    cfg = common.parse_config(vit.Config, ["--method", "gse", "--alpha", "0.5", "--seed", "3"])
    assert cfg.dst == DSTConfig.for_method("gse", alpha=0.5, seed=3)
    assert cfg.dst.delta_t == 1000 and cfg.dst.distribution == "er"
    assert common.parse_config(bert.Config, ["--no-ablation", "--method", "srigl"]).dst.ablation is False


def test_the_table_collects_summaries_into_mean_and_spread(tmp_path, capsys):
    from train import table
    for seed, acc in ((0, 0.9), (1, 0.8)):
        run = tmp_path / f"rigl-{seed}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({
            "entry": "vit", "method": "rigl", "sparsity": 0.9, "test": {"accuracy": acc}, "steps": 10,
            "density": {"overall": 0.1}, "step_time_ms": {"median": 5.0}, "config": {"seed": seed},
            "command": f"python -m train.vit --seed {seed}"}))
    assert table.main([str(tmp_path), "--json", str(tmp_path / "t.json")]) == 0
    assert "| rigl | 0.9 | 85.00 ± 7.07 | 0.100 | 5 | 2 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())[0]["commands"][1] == "python -m train.vit --seed 1"
    assert table.main([str(tmp_path / "nothing")]) == 2


def test_section_comments_are_not_glued_to_a_field():
    comments = common.field_comments(vit.Config)
    assert comments["data_dir"].endswith("the Debian package's path)")
    assert "GSE's samplers" in common.field_comments(DSTConfig)["grow"]   # a continuation line


@pytest.mark.parametrize("entry", [vit, bert, gpt])
def test_help_lists_every_flag_and_exits_0(entry, capsys):
    with pytest.raises(SystemExit) as e:
        entry.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(entry.Config):
        if f.name != "dst":
            assert "--" + f.name.replace("_", "-") in text
    assert "--delta-t" in text and "--gamma-sal" in text and "--seed" in text


@pytest.mark.parametrize("entry", [vit, bert, gpt])
def test_the_shared_flags_join_each_trainers_own_sections(entry):
    parser = flags.build_parser(entry.Config)
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups if g._group_actions}
    assert list(groups)[1:] == ["data", "model", "optimisation", "DST (dst.DSTConfig)",
                                "evaluation, logging, checkpoints", "run"]
    assert groups["model"][:2] == ["preset", "patch_size" if entry is vit else "dropout"]
    assert {"dim", "mlp_dim", "fused_mlp", "dropout"} <= set(groups["model"])
    assert {"steps", "lr", "optimizer", "grad_clip"} <= set(groups["optimisation"])
    assert groups["run"][0] == "seed" and "grad_sync" in groups["run"]
