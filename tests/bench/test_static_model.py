"""bench/static.py's traffic model: the glue it adds to an op's HBM bytes is the torch work
around the kernels, never the project's custom ops' own inputs and outputs (which the model
counts already as the op's activations and values). Run in a subprocess: the report compiles
(TRITON_INTERPRET=0) while this test session runs the interpreter."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

_PROBE = r'''
import json, torch, kernels
from bench import sass, static

kernels.set_checks(False)
kernels.set_backend("triton")  # CPU tensors take the Triton launchers: captured, never run
out = {}

# 1. A diagonal forward has no torch work around its kernel once its pattern lists exist.
layer = kernels.DiagLinear(64, 256, 0.25, block_size=16, bias=False)
x = torch.empty(256, 64)
with torch.no_grad(), sass.recording():
    layer(x)  # builds (and caches) the tile lists
glue = static.GlueBytes()
with torch.no_grad(), sass.recording() as seen, glue:
    layer(x)
out["fwd"] = dict(bytes=glue.bytes, ops=glue.ops, launches=len(seen),
                  op_io=(x.numel() + 256 * 256 + layer.values.numel()) * 4)

# 2. Torch work inside a custom op's launcher is still glue: a probe op that copies its input
# twice (cat) and returns a fresh tensor.
@torch.library.custom_op("alwayssparse::_glue_probe", mutates_args=())
def probe(a: torch.Tensor) -> torch.Tensor:
    torch.cat([a, a])
    return torch.empty_like(a)

a = torch.empty(64, 64)
glue = static.GlueBytes()
with glue:
    probe(a)
out["probe"] = dict(bytes=glue.bytes, ops=glue.ops, names=glue.names, a=a.numel() * 4)

# 3. The weight gradient's partial sums over token chunks (inside its launcher) are glue.
op = [o for o in static.build_ops(["diag16"], ["fc1"], [50432], ["bfloat16"], torch.device("cpu"))
      if o.product == "dw"][0]
static.capture(op, execute=False)
g = [t for t in op.launches[0].args if isinstance(t, torch.Tensor)][-1]  # the kernel's output
out["dw"] = dict(bytes=op.glue_bytes, ops=op.glue_ops, error=op.error, partial=g.numel() * g.element_size(),
                 partial_dims=g.dim(), values=op.nnz)
# 4. L1 hits only for loads that go through L1: a b = 16 forward at 64-token tiles, its
# main loop as synchronous LDG (L1-cached) and as 16-byte cp.async (L1-bypassing).
op = [o for o in static.build_ops(["diag16"], ["fc1"], [50432], ["bfloat16"], torch.device("cpu"))
      if o.product == "fwd"][0]
cached, bypass = (sass.Sass(loop_loads=loads) for loads in ("LDG.Ex2 LDG.E.128x20", "LDGSTS.Ex2 LDGSTS.E.BYPASS.128x20"))
programs = -(-50432 // 64) * 6
out["l1"] = dict(flags=[static.l1_cached(cached), static.l1_cached(bypass), static.l1_cached(None)],
                 l2_cached=static.traffic(op, 2, 64, programs, static.l1_cached(cached))[1],
                 l2_bypass=static.traffic(op, 2, 64, programs, static.l1_cached(bypass))[1],
                 gathered=50432 * op.nnz / 16 * 2)
# 5. The fused MLP's backward: its two weight-gradient launches read their stacked slices
# (N_GROUPS x (G + 1) a token, from each launch's own table), not two per stored block.
op = [o for o in static.build_ops(["mlp16"], ["fc1"], [4096], ["bfloat16"], torch.device("cpu"))
      if o.product == "bwd"][0]
static.capture(op, execute=False)
dws = [l for l in op.launches if l.name == "diag_dw_kernel"]
tables = [dict(zip([p.name for p in l.fn.params], l.args)) | l.kwargs for l in dws]
slices = tuple(static.stacked_slices(l) for l in dws)
out["mlp_bwd"] = dict(error=op.error, slices=slices,
                      expected=[int(t["groups_ptr"].shape[0]) * (int(t["G"]) + 1) for t in tables],
                      stacked=static.traffic(op, 2, 128, None, True, slices)[1],
                      per_block=static.traffic(op, 2, 128, None, True, None)[1],
                      blocks=op.nnz / 2 / 16 ** 2, tokens=op.tokens)
# 6. The band weight gradient (b = 16 bf16 from T = 8192): each program's distinct dy and x
# blocks a token (its repeats hit in L1), from its own table.
op = [o for o in static.build_ops(["diag16"], ["fc1"], [50432], ["bfloat16"], torch.device("cpu"))
      if o.product == "dw"][0]
static.capture(op, execute=False)
band = [l for l in op.launches if l.name == "diag_dw_band_kernel"]
args = dict(zip([p.name for p in band[0].fn.params], band[0].args)) | band[0].kwargs if band else {}
nb = int(args.get("NB", 0))
table = args["table_ptr"].tolist() if band else []
distinct = sum(len(set(r[nb:2 * nb])) + len(set(r[2 * nb:])) for r in table)
sl = static.stacked_slices(band[0]) if band else None
out["band"] = dict(launches=[l.name for l in op.launches], nb=nb, slices=sl, distinct=distinct,
                   l2=static.traffic(op, 2, 16, None, True, sl)[1], tokens=op.tokens, blocks=op.nnz / 16 ** 2,
                   weights=op.nnz * 2 + op.index_bytes)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("static") / "glue_probe.py"
    path.write_text(_PROBE)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_glue_counts_the_torch_work_around_kernels_not_the_custom_ops_own_io(probe):
    out = probe
    fwd = out["fwd"]
    # The old count added the op's x + y + values (here 196 KB) to the HBM bytes a second time.
    assert fwd["launches"] == 1 and fwd["op_io"] > 4096
    assert fwd["bytes"] == 0 and fwd["ops"] == 0, fwd
    # Inside a custom op the mode still sees the launcher's torch ops: cat reads a and writes
    # 2a (3 passes of a), while the op's own input and output (2 passes) are not counted.
    probe = out["probe"]
    assert probe["names"] == {"cat": 1} and probe["bytes"] == 3 * probe["a"], probe
    # The chunked weight gradient: the fp32 partials [chunks, K, D, b, b] are summed (read
    # them, write fp32 [K, D, b, b]) and cast to bf16 (read fp32, write bf16).
    dw = out["dw"]
    assert not dw["error"] and dw["partial_dims"] == 5, dw
    assert dw["bytes"] == dw["partial"] + 4 * dw["values"] + (4 + 2) * dw["values"], dw
    assert dw["ops"] == 2, dw


def test_l1_hits_are_counted_only_for_loads_that_go_through_l1(probe):
    l1 = probe["l1"]
    assert l1["flags"] == [True, False, True]
    # cp.async bypassing L1: every block's x slice comes from L2 again (the plain gathered count)
    assert l1["l2_bypass"] > l1["gathered"] > l1["l2_cached"], l1


def test_mlp_backward_counts_the_stacked_weight_gradient_slices(probe):
    m = probe["mlp_bwd"]
    assert not m["error"] and len(m["slices"]) == 2, m
    assert m["slices"] == m["expected"], m  # N_GROUPS x (G + 1) of each launch's table
    # b = 16, K = 20: 5 stacks of G = 4 on each of 48 shared blocks, 48 x 5 x 5 = 1200 slices
    # a token per layer against 2 x 960 blocks; the L2 count drops by exactly the difference
    saved = m["tokens"] * (2 * 2 * m["blocks"] - sum(m["slices"])) * 16 * 2
    assert m["per_block"] - m["stacked"] == pytest.approx(saved) and saved > 0, m


def test_band_weight_gradient_counts_each_programs_distinct_slices(probe):
    m = probe["band"]
    assert m["launches"] == ["diag_dw_band_kernel"], m
    # ViT-B fc1, K = 20, 128 blocks a program: 552 distinct slices a token (733 at 64), not
    # the stacks' 1200
    assert m["nb"] == 128 and m["slices"] == m["distinct"] == 552, m
    # the slices, 16 bf16 features a token each, plus the values and offsets once (the gradient)
    assert m["l2"] == pytest.approx(m["tokens"] * m["slices"] * 16 * 2 + m["weights"]), m
    assert m["slices"] < 1.25 * m["blocks"], m
