"""kernels/_names.py: this project's kernels and Hugging Face's hub client (distribution
``kernels``, required by transformers >= 5.25) in one process - from a checkout's root, where
the top-level ``kernels`` is ours and serves the hub's API too, and from anyone else's project,
where it is the hub client's and ours is ``alwayssparse.kernels``. Each case runs in a fresh
process: which name is imported first, from where, is the thing under test."""
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HUB = importlib.util.find_spec("transformers") is not None and any(
    d.metadata["Name"] == "kernels" for d in importlib.metadata.distributions())
needs_hub = pytest.mark.skipif(not HUB, reason="Hugging Face's `kernels` (a transformers >= 5.25 dependency) is not installed")

# One copy of each of our modules: every module object loaded from kernels/ is bound to one
# file once (two names may share it), so the torch.library ops were registered once.
ONE_COPY = """
import sys
from pathlib import Path
ours = {}
for name, m in list(sys.modules.items()):
    f = getattr(m, "__file__", None)
    if f and Path(f).resolve().is_relative_to(KERNELS_DIR):
        ours.setdefault(Path(f).resolve(), set()).add(id(m))
twice = {str(f): len(ids) for f, ids in ours.items() if len(ids) > 1}
assert not twice, twice
assert len(ours) > 10, sorted(ours)
"""

BERT = """
from transformers import BertConfig, BertForMaskedLM
bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16))
"""


def _run(code: str, cwd: Path, kernels_dir: Path = ROOT / "kernels", pythonpath: str | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    prelude = f"from pathlib import Path\nKERNELS_DIR = Path({str(kernels_dir.resolve())!r})\n"
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _installed() -> bool:
    """Is this checkout installed in editable mode (the README's set-up), so that
    ``alwayssparse.kernels`` resolves to it outside it?"""
    for dist in importlib.metadata.distributions(name="alwayssparse-dst"):   # a checkout's egg-info too
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        if url.get("dir_info", {}).get("editable") and url.get("url") == ROOT.resolve().as_uri():
            return True
    return False


needs_install = pytest.mark.skipif(not _installed(), reason="the project is not installed here (bash .ci/setup installs it)")

FIRST = {
    "kernels first": "import kernels\nimport transformers",
    "transformers first": "import transformers\nimport kernels",
    "dst first": "import dst\nimport kernels\nimport transformers",
}


@needs_hub
@pytest.mark.parametrize("first", list(FIRST))
def test_repo_root_has_our_kernels_and_the_hub_api_in_one_process(first):
    _run(FIRST[first] + BERT + """
import torch
layer = kernels.DiagLinear(64, 32, density=0.25, block_size=8)
assert layer(torch.randn(3, 64)).shape == (3, 32)
# what transformers asks the hub client for, from the same `kernels`
from kernels import CUDAProperties, LayerRepository, Mode, get_kernel, kernelize, use_kernel_forward_from_hub
from kernels._internals.layer import mode
assert Mode is mode.Mode and kernels.__version__ == __import__("importlib.metadata").metadata.version("kernels")
assert bert(torch.randint(0, 64, (2, 8))).logits.shape == (2, 8, 64)
""" + ONE_COPY + "print('ok')", cwd=ROOT)


@pytest.mark.parametrize("first", ["layout name first", "installed name first"])
def test_both_names_are_one_package_at_the_repo_root(first):
    names = ["kernels", "alwayssparse.kernels"]
    if first == "installed name first":
        names.reverse()
    _run(f"""
import importlib
a = importlib.import_module({names[0]!r})
import dst, models.sparsify
b = importlib.import_module({names[1]!r})
import kernels, alwayssparse.kernels, kernels.diag.kernel
assert a is b and kernels is alwayssparse.kernels
assert kernels.fanin is alwayssparse.kernels.fanin and kernels.diag.kernel is alwayssparse.kernels.diag.kernel
assert dst.sparsifier.SparseLayer is kernels.SparseLayer
""" + ONE_COPY + "print('ok')", cwd=ROOT)


def test_an_uninstalled_checkout_works_from_its_root(tmp_path):
    # The install's finders taken away: what a checkout on PYTHONPATH alone (bench/gpu_check.sh) sees.
    _run("""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
sys.path_importer_cache.clear()
for name in [n for n in sys.modules if n == "alwayssparse" or n.startswith("alwayssparse.")]:
    del sys.modules[name]
import dst, kernels, alwayssparse.kernels
assert kernels is alwayssparse.kernels and dst.layers.SparseLayer is kernels.SparseLayer
""" + ONE_COPY + "print('ok')", cwd=ROOT, pythonpath=str(ROOT))


SPARSIFY_BERT = BERT + """
import torch
import dst
from models.sparsify import sparsify
cfg = dst.DSTConfig.for_method("rigl", sparsity=0.9, delta_t=1)
swapped = sparsify(bert.bert.encoder, lambda name, lin: dst.make_layer(cfg, lin.in_features, lin.out_features, density=0.1))
assert swapped, "nothing was sparsified"
sparsifier = dst.Sparsifier(bert, cfg, total_steps=10)
opt = torch.optim.SGD(bert.parameters(), lr=0.1)
ids = torch.randint(0, 64, (2, 8))
reports = []
for step in range(3):
    with sparsifier.capture(step):
        bert(ids, labels=ids).loss.backward()
    opt.step(); opt.zero_grad()
    reports.append(sparsifier.step(step, opt))
assert any(r and sum(layer["grown"] for layer in r["layers"].values()) > 0 for r in reports), reports
# our kernels under their installed name; the hub client keeps the top-level one
import alwayssparse.kernels as K
assert isinstance(K.DiagLinear(64, 32, density=0.25, block_size=8), K.SparseLayer)
"""


@needs_install
def test_another_project_imports_dst_models_and_our_kernels(tmp_path):
    out = _run(f"HUB = {HUB}\n" + SPARSIFY_BERT + """
import kernels
print("top-level kernels:", kernels.__file__)
if HUB:
    assert not Path(kernels.__file__).resolve().is_relative_to(KERNELS_DIR), kernels.__file__
    from kernels import get_kernel, Mode   # the hub client, untouched
""" + ONE_COPY + "print('ok')", cwd=tmp_path)
    assert "top-level kernels" in out


@needs_hub
def test_a_wheel_installs_our_kernels_beside_the_hub_client(tmp_path):
    # Not editable: the files land in site-packages, ours under alwayssparse/kernels/ and the
    # hub client's in kernels/ (two packages in one folder before).
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"no build backend here: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("alwayssparse_dst-*.whl")
    import zipfile
    files = zipfile.ZipFile(wheel).namelist()
    assert "alwayssparse/kernels/__init__.py" in files and "alwayssparse/kernels/cpu/sparse_cpu.c" in files
    assert "dst/__init__.py" in files and "models/sparsify.py" in files and "train/vit.py" in files
    assert not [f for f in files if f.startswith("kernels/")], "the wheel must not write into the hub client's folder"
    zipfile.ZipFile(wheel).extractall(site)
    code = f"SITE = Path({str(site.resolve())!r})\n" + SPARSIFY_BERT + """
import dst
assert Path(dst.__file__).resolve().is_relative_to(SITE) and Path(K.__file__).resolve().is_relative_to(SITE)
import kernels
assert not Path(kernels.__file__).resolve().is_relative_to(SITE)
""" + ONE_COPY + "print('ok')"
    _run(code, cwd=tmp_path, kernels_dir=site / "alwayssparse" / "kernels", pythonpath=str(site))
