"""bench/cpu_attention.py: its --quick run checks both paths against fp64 and writes the table;
a wrong path is refused before it is timed."""
import pytest
import torch

from bench import cpu_attention
from models import attention

from .conftest import read_rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quick_run_checks_both_paths_and_writes_their_ratio(dtype, tmp_path):
    assert cpu_attention.main(["--quick", "--threads", "1", "--dtype", dtype, "--out", str(tmp_path)],
                              log=lambda *a: None) == 0
    rows = read_rows(tmp_path / f"cpu_attention_{dtype}.csv")
    assert {(r["shape"], r["mode"], r["backend"]) for r in rows} == {
        (s, m, b) for s in cpu_attention.QUICK_SHAPES for m in ("forward", "forward + backward") for b in ("sdpa", "bmm")}
    for r in rows:
        assert float(r["ms_per_call"]) > 0 and float(r["max_err"]) <= float(r["err_bound"])
        assert r["auto"] in ("sdpa", "bmm") and r["dtype"] == dtype
        if r["backend"] == "sdpa":
            assert float(r["x_sdpa"]) == pytest.approx(1.0)
    assert "x sdpa" in (tmp_path / f"cpu_attention_{dtype}.md").read_text()


def test_a_wrong_bmm_path_is_refused_before_it_is_timed(tmp_path, monkeypatch):
    real = attention._BmmAttention.apply
    monkeypatch.setattr(attention._BmmAttention, "apply", lambda qkv, *a: real(qkv, *a) * 1.05)
    with pytest.raises(AssertionError, match="bmm output"):
        cpu_attention.main(["--quick", "--threads", "1", "--out", str(tmp_path)], log=lambda *a: None)


def test_an_unknown_shape_is_refused_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        cpu_attention.main(["--shapes", "vit-b16 b8,huge"])
    assert "unknown --shapes ['huge']" in capsys.readouterr().err
