"""--help and flag errors of the entry points: grouped by the config's sections, each DST
flag with its methods and paper defaults, and no torch imported on the way (train/flags.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

from train import flags, vit

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(*args):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    names = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return done, names


@pytest.mark.parametrize("args, code", [
    (["train.vit", "--help"], 0), (["train.bert", "--help"], 0),
    (["train.vit", "--optimizer", "adam"], 2), (["train.bert", "--seq-len", "4"], 2),
    (["train.vit", "--method", "magic"], 2),
    (["train.gpt", "--help"], 0), (["train.gpt", "--seq-len", "4"], 2), (["train.gpt", "--dropout", "1"], 2),
])
def test_help_and_flag_errors_return_before_torch_is_imported(args, code):
    done, modules = _imported_modules(*args)
    assert done.returncode == code, done.stderr[-2000:]
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "triton", "numpy", "kernels", "datasets"))
    assert not heavy, heavy[:10]
    if code == 2:
        assert "error:" in done.stderr.splitlines()[-1]


def test_help_groups_flags_by_section_with_each_methods_default(capsys):
    with pytest.raises(SystemExit):
        flags.parse_config(vit.Config, ["--help"], prog="p")
    text = capsys.readouterr().out
    headers = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert [h.split(" (")[0].rstrip(":") for h in headers] == [
        "options", "data", "model", "optimisation", "DST", "evaluation, logging, checkpoints", "run"], headers
    flat = " ".join(text.split())
    assert text.startswith("usage: p [--method {dense,static,set,rigl,srigl,dynadiag,gse}]")
    assert "[set, rigl, srigl, dynadiag, gse] (default: 100; gse: 1000)" in flat        # --delta-t, METHODS order
    assert "(default: uniform; static, rigl: erk; gse: er)" in flat                     # --distribution
    assert "[srigl] (default: 0.95)" in flat                                            # --gamma-sal

