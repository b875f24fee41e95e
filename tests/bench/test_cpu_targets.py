"""bench/cpu_targets.py judges issue 23's targets from a cpu_check folder: the CPU's class from
the log's flags line, the last run of each CSV, met / missed / not measured, the e2e tables of
folders written before their CSVs were kept, and clear errors for a bad folder or flags."""
import pytest

from bench import common, cpu_infer, cpu_targets, e2e

from .conftest import ROOT

FLAG_LINES = {"amx": "amx_bf16 amx_tile avx2 avx512_bf16 avx512f ", "avx512_bf16": "avx2 avx512_bf16 avx512f ",
              "avx2": "avx2 "}


def _infer_rows(run: str, batch: int, ratios: dict[str, tuple[float, float]]) -> list[dict]:
    """cpu_infer.py's bf16 rows: {variant: (x dense bf16, x dense fp32)}."""
    return [{"run": run, "batch": batch, "variant": v, "x_dense": a, "x_dense_fp32": b} for v, (a, b) in ratios.items()]


def _folder(tmp_path, klass: str, b16_32: float = 6.0, vit_infer: float = 2.5) -> object:
    (tmp_path / "cpu_check.log").write_text(f"cpu_check ...\nModel name: Some CPU\n{FLAG_LINES[klass]}\n"
                                            "variant x features [] error None\n")
    for batch in (1, 32, 256):
        path = tmp_path / f"cpu_infer_bf16_batch{batch}.csv"
        # an older run first: only the last run in a file counts
        common.append_csv(path, _infer_rows("old", batch, {cpu_targets.B16: (0.5, 0.5)}), cpu_infer.FIELDS_BF16)
        ratios = {cpu_targets.DENSE_BF16: (1.0, 1.1), cpu_targets.B16: ({1: 20.0, 32: b16_32}.get(batch, 3.5), 7.0),
                  cpu_targets.FANIN: (8.0 if batch == 1 else 3.0, 6.0), "SparseLinear bf16": (5.5 if batch == 1 else 3.0, 6.0),
                  "fan-in (condensed) fp32": (0.1, 0.1)}  # fp32 rows are not the "every format" figure
        common.append_csv(path, _infer_rows("new", batch, ratios), cpu_infer.FIELDS_BF16)
    rows = [{"run": "r", "model": "vit-b16", "format": f, "status": "ok", "x_dense_infer": x} for f, x in
            (("dense", 1.0), ("diag16", vit_infer), ("fanin", 1.2))]
    common.write_csv(tmp_path / "e2e_infer.csv", rows, e2e.FIELDS)
    rows = [{"run": "r", "model": "vit-b16", "format": f, "status": s, "x_dense_train": x, "x_dense_infer": 9.0}
            for f, s, x in (("dense", "ok", 1.0), ("diag16", "ok", 1.4), ("fanin", "skipped", 9.0))]
    common.write_csv(tmp_path / "e2e_train.csv", rows, e2e.FIELDS)
    return tmp_path


def _verdicts(folder) -> dict[tuple[str, str], dict]:
    klass = cpu_targets.cpu_class(cpu_targets.logged_flags(folder / "cpu_check.log"))
    return {(r["figure"], r["anchor"]): r for r in cpu_targets.judge(folder, klass)}


def test_the_cpu_class_comes_from_the_logged_flags(tmp_path):
    for klass in cpu_targets.CLASSES:
        assert cpu_targets.cpu_class(cpu_targets.logged_flags(_folder(tmp_path, klass) / "cpu_check.log")) == klass
    assert cpu_targets.logged_flags(tmp_path / "missing.log") is None


def test_xeon_targets_met_missed_and_not_measured(tmp_path):
    v = _verdicts(_folder(tmp_path, "amx", b16_32=3.6))
    b16 = v[("DiagLinear b=16, 32 tokens", "dense bf16")]
    assert (b16["measured"], b16["target"], b16["verdict"]) == ("3.60x", ">= 4x", "missed by 1.11x")
    assert v[("DiagLinear b=16, 256 tokens", "dense bf16")]["verdict"] == "met"  # 3.5 >= 3
    assert v[("FanInLinear, 32 tokens", "dense bf16")]["verdict"] == "met"  # 3.0 >= 2.5
    one = v[("every format, 1 token (the slowest)", "dense bf16")]
    assert (one["measured"], one["of"], one["verdict"]) == ("5.50x", "SparseLinear bf16", "met")
    vit = v[("ViT-B/16 inference, batch 32, bf16 autocast", "the dense model under autocast")]
    assert vit["measured"] == "2.50x" and vit["of"].startswith("diag16 (e2e_infer:")  # not the train run's 9.0
    train = v[("ViT-B/16 training step, batch 32, bf16 autocast", "the dense model under autocast")]
    assert (train["measured"], train["verdict"]) == ("1.40x", "missed by 1.07x")  # the skipped fan-in row left out
    bert = v[("BERT-base training step, bf16 autocast", "the dense model under autocast")]
    assert bert["verdict"] == "not measured"
    assert v[("DiagLinear b=16, 32 tokens", "dense fp32")]["verdict"] == "report"


def test_avx2_targets_are_against_dense_fp32(tmp_path):
    v = _verdicts(_folder(tmp_path, "avx2"))
    assert v[("DiagLinear b=16, 32 tokens", "dense fp32")]["verdict"] == "met"  # 7.0 >= 3
    assert ("FanInLinear, 32 tokens", "dense bf16") not in v  # no AVX2 target
    assert v[("ViT-B/16 inference, batch 32, bf16 autocast", "the dense model under autocast")]["verdict"] == "report"


def test_main_writes_the_report_and_strict_fails_on_a_miss(tmp_path, capsys):
    folder = _folder(tmp_path, "avx512_bf16", b16_32=3.0)
    assert cpu_targets.main([str(folder)]) == 0
    assert "CPU class: **avx512_bf16**" in (folder / "cpu_targets.md").read_text()
    assert cpu_targets.main([str(folder), "--strict"]) == 1
    assert "missed by 1.33x" in capsys.readouterr().out


def test_bad_folder_and_flags_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cpu_targets.main([str(tmp_path / "nope")])
    assert "folder:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cpu_targets.main([str(tmp_path)])  # no cpu_check.log
    assert "--flags:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cpu_targets.main([str(tmp_path), "--flags", "avx512_bf16 sse9"])
    assert "sse9" in capsys.readouterr().err


def test_the_committed_zen4_folder_reads_its_e2e_tables():
    """The folder of 2026-12-07 (before the e2e CSVs were kept): every infer and e2e figure is found."""
    folder = ROOT / "bench/results/cpu_check/amd_epyc_avx512_bf16"
    v = _verdicts(folder)
    for key in (("DiagLinear b=16, 32 tokens", "dense bf16"), ("every format, 1 token (the slowest)", "dense bf16"),
                ("ViT-B/16 inference, batch 32, bf16 autocast", "the dense model under autocast"),
                ("ViT-B/16 training step, batch 32, bf16 autocast", "the dense model under autocast")):
        assert v[key]["measured"] != "-", v[key]
    assert v[("ViT-B/16 training step, batch 32, bf16 autocast", "the dense model under autocast")]["measured"] == "2.00x"
