"""bench/cpu_check.sh and bench/gpu_check.sh run end to end under a budget too small for the
heavy phases: the shared phase runner (bench/phases.sh) sources, the first phase runs, every
later one is skipped with the budget left, and the log lists what was written."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, out: Path, budget_var: str, budget: int) -> str:
    env = {**os.environ, budget_var: str(budget), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "bench" / script), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return (out / script.replace(".sh", ".log")).read_text()


def test_cpu_check_names_the_build_and_skips_what_the_budget_cannot_hold(tmp_path):
    log = _run("cpu_check.sh", tmp_path, "CPU_CHECK_BUDGET_S", 40)
    assert "== 1 this CPU: exit 0" in log
    assert re.search(r"^variant \S+ features \[.*\] error None$", log, re.M), log
    for name in ("3 cpu_infer bf16, batch 256", "5b e2e ViT-B/16 batch 32, bf16 autocast, training step"):
        assert re.search(rf"== {re.escape(name)}: skipped, -?\d+ s of the budget left", log), log
    assert "./cpu_check.log" in log.split("files:")[-1]


def test_gpu_check_skips_every_phase_without_budget(tmp_path):
    log = _run("gpu_check.sh", tmp_path, "GPU_CHECK_BUDGET_S", 5)
    for n in ("1 GPU tests", "2 static report, measured", "6 train.vit on the GPU"):
        assert re.search(rf"== {re.escape(n)}.*: skipped, -?\d+ s of the budget left", log), log
