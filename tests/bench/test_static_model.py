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
# 5. MLP ops that run as separate launches (the backward; the b = 16 forward from T = 8192,
# unfused): each launch modelled as the layer op it is, the parts summed.
out["by_launch"] = {}
for T in (4096, 50432):
    for op in static.build_ops(["mlp16"], ["fc1"], [T], ["bfloat16"], torch.device("cpu")):
        static.capture(op, execute=False)
        gpu = {"H200": static.GPUS["H200"]}
        whole = static.predict_by_launch(op, [None] * len(op.launches), gpu)
        parts = []
        for l in op.launches if whole is not None else []:
            view = static._layer_view(op, l)
            bt = l.constexprs().get("BLOCK_T")
            m = static.predict(view, None, l.programs(), gpu["H200"], bt, static.launch_slices(l, None))
            args = l.bound()
            parts.append(dict(name=l.name, t=m["t"], l2=m["l2"], hbm=m["hbm"], product=view.product,
                              n_in=view.n_in, n_out=view.n_out, epilogue=args.get("EPILOGUE"),
                              slices=static.launch_slices(l, None)))
        out["by_launch"][f"{op.product} {T}"] = dict(
            error=op.error, parts=parts, glue=op.glue_bytes, glue_ops=op.glue_ops,
            glue_s=static.TORCH_OP_S * op.glue_ops + op.glue_bytes / gpu["H200"]["hbm"],
            whole=None if whole is None else {k: whole["H200"][k] for k in ("t", "l2", "hbm")})
# 6. The band weight gradient (b = 16 bf16 from T = 8192): each program's distinct dy and x
# blocks a token (its repeats hit in L1), from its own table.
op = [o for o in static.build_ops(["diag16"], ["fc1"], [50432], ["bfloat16"], torch.device("cpu"))
      if o.product == "dw"][0]
static.capture(op, execute=False)
band = [l for l in op.launches if l.name == "diag_dw_band_kernel"]
args = band[0].bound() if band else {}
nb = int(args.get("NB", 0))
table = args["table_ptr"].tolist() if band else []
distinct = sum(len(set(r[nb:2 * nb])) + len(set(r[2 * nb:])) for r in table)
sl = static.stacked_slices(band[0]) if band else None
out["band"] = dict(launches=[l.name for l in op.launches], nb=nb, slices=sl, distinct=distinct,
                   l2=static.traffic(op, 2, 16, None, True, sl)[1], tokens=op.tokens, blocks=op.nnz / 16 ** 2,
                   weights=op.nnz * 2 + op.index_bytes)
# 7. The block kernel's gathered operand: its programs' loads replayed through the LRU (the
# launch's own tile list, NB, BLOCK_T and TILE_GROUP), for loads through L1 only.
op = [o for o in static.build_ops(["diag16"], ["fc2"], [50432], ["bfloat16"], torch.device("cpu"))
      if o.product == "fwd"][0]
static.capture(op, execute=False)
l = op.launches[0]
a = l.bound()
from kernels.diag.pattern import tile_l1_slices
cap = 128 * 1024 // (int(a["BLOCK_T"]) * 16 * 2)
out["replay"] = dict(slices=static.launch_slices(l, cached), bypass=static.launch_slices(l, bypass),
                     own=tile_l1_slices(a["tile_ptr"], a["entries_ptr"], 48, 192, 48, True, int(a["NB"]),
                                        int(a["TILE_GROUP"]), cap),
                     none=tile_l1_slices(a["tile_ptr"], a["entries_ptr"], 48, 192, 48, True, int(a["NB"]),
                                         int(a["TILE_GROUP"]), 0),
                     blocks=op.nnz / 16 ** 2, bt=int(a["BLOCK_T"]),
                     l2=static.traffic(op, 2, int(a["BLOCK_T"]), l.programs(), True, static.launch_slices(l, cached))[1],
                     weights=op.nnz * 2 + op.index_bytes, tokens=op.tokens)
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


def test_mlp_ops_of_separate_launches_are_the_sum_of_their_layer_models(probe):
    m = probe["by_launch"]
    # the fused kernel below 8192 tokens (its own formula), the two products from there on
    assert m["fwd 4096"]["whole"] is None, m["fwd 4096"]
    fwd = m["fwd 50432"]
    assert [(p["name"], p["epilogue"], p["n_in"], p["n_out"]) for p in fwd["parts"]] == [
        ("diag_block_kernel", 3, 768, 3072), ("diag_block_kernel", 0, 3072, 768)], fwd
    for key in ("fwd 50432", "bwd 4096", "bwd 50432"):
        r = m[key]
        assert not r["error"] and r["whole"], r
        assert r["whole"]["l2"] == pytest.approx(sum(p["l2"] for p in r["parts"])), key
        assert r["whole"]["hbm"] == pytest.approx(sum(p["hbm"] for p in r["parts"]) + r["glue"]), key
        assert r["whole"]["t"] == pytest.approx(sum(p["t"] for p in r["parts"]) + r["glue_s"]), key
    # the backward: h (and gelu(h)), dW2, dh, dx, dW1; each weight gradient reads its own
    # table's slices (stacks at 4096 tokens, bands at 50,432), never 2 per stored block
    for key in ("bwd 4096", "bwd 50432"):
        parts = m[key]["parts"]
        assert [p["product"] for p in parts] == ["fwd", "dw", "fwd", "fwd", "dw"], parts
        assert all(p["slices"] for p in parts if p["product"] == "dw"), parts
    assert m["bwd 50432"]["glue_s"] > 0  # the partial sums of dW and b1's column sum
    # a GELU epilogue's second tensor (gelu(h) written, or h read for dh) is HBM beside the
    # layer's own x and y (and its values and offsets): T x 3072 x 2 bytes more
    b = m["bwd 50432"]["parts"]
    assert [p["epilogue"] for p in b] == [1, None, 2, 0, None], b
    f = m["fwd 50432"]["parts"]  # the same fc1 product without the second tensor
    assert b[0]["hbm"] - f[0]["hbm"] == 50432 * 3072 * 2, (b[0], f[0])


def test_band_weight_gradient_counts_each_programs_distinct_slices(probe):
    m = probe["band"]
    assert m["launches"] == ["diag_dw_band_kernel"], m
    # ViT-B fc1, K = 20, 128 blocks a program: 552 distinct slices a token (733 at 64), not
    # the stacks' 1200
    assert m["nb"] == 128 and m["slices"] == m["distinct"] == 552, m
    # the slices, 16 bf16 features a token each, plus the values and offsets once (the gradient)
    assert m["l2"] == pytest.approx(m["tokens"] * m["slices"] * 16 * 2 + m["weights"]), m
    assert m["slices"] < 1.25 * m["blocks"], m


def test_block_kernel_l2_count_replays_each_programs_loads_through_l1(probe):
    m = probe["replay"]
    assert m["bypass"] is None  # cp.async past L1: the plain count (a slice per block) instead
    assert m["slices"] == m["own"] > 0, m
    # without L1 every block's slice is read: 20 diagonals x 48 output blocks a token
    assert m["none"] == m["blocks"] == 960, m
    assert m["slices"] < 0.5 * m["none"], m  # ascending windows ~10 blocks apart overlap
    T, bt = m["tokens"], m["bt"]
    assert m["l2"] == pytest.approx(T * m["slices"] * 16 * 2 + m["weights"] * -(-T // bt)), m
