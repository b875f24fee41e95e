"""DST flags the chosen method does not read are named in a warning, and --help says which
methods read each DST flag."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train import common, vit

ROOT = Path(__file__).resolve().parents[2]


def test_flags_of_another_method_are_named_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "train.vit", "--method", "rigl", "--block-size", "16", "--gamma-sal",
                           "0.3", "--preset", "micro", "--steps", "2", "--warmup", "1", "--batch-size", "16",
                           "--eval-examples", "32", "--out-dir", str(tmp_path / "run"), "--no-progress", "--no-plots",
                           "--threads", "1"], cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: --gamma-sal, --block-size do not apply to --method rigl" in done.stderr, done.stderr


@pytest.mark.parametrize("method, flags, ignored", [
    ("rigl", ["--delta-t", "10", "--alpha", "0.2", "--scope", "global"], []),
    ("set", ["--grow", "uniform", "--t-end", "0.5"], ["--grow"]),
    ("dynadiag", ["--block-size", "4", "--t-end", "0.5", "--ablation"], ["--t-end", "--ablation"]),
    ("dense", ["--delta-t", "50", "--sparsity", "0.9"], ["--delta-t"]),
])
def test_only_the_flags_a_method_ignores_are_warned_about(method, flags, ignored, capsys):
    common.parse_config(vit.Config, ["--method", method, *flags], prog="p")
    err = capsys.readouterr().err
    if ignored:
        assert f"p: warning: {', '.join(ignored)} do" in err and f"not apply to --method {method}" in err, err
    else:
        assert err == ""


def test_help_names_the_methods_of_each_dst_flag(capsys):
    with pytest.raises(SystemExit):
        common.parse_config(vit.Config, ["--help"], prog="p")
    text = " ".join(capsys.readouterr().out.split())
    assert "--gamma-sal FLOAT SRigL salience threshold" in text and "[srigl]" in text
    assert "--block-size INT DynaDiag block size" in text and "[dynadiag]" in text
