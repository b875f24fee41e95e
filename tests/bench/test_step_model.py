"""bench/step_model.py: the traced step's ops, the affine extrapolation in the batch (against a
trace at that batch), what each op is charged, and the whole chain on a micro ViT. Run in a
subprocess: the model compiles (TRITON_INTERPRET=0) while this test session interprets."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

_PROBE = r'''
import json, dataclasses, torch
import torch.nn.functional as F
from bench import static, step_model as sm

out = {"consts": dict(hbm=static.GPUS["H200"]["hbm"], fp32=static.GPUS["H200"]["fp32"], cublas=static.CUBLAS_S,
                      torch_op=static.TORCH_OP_S, min_bytes=sm.MIN_BYTES)}
as_dicts = lambda calls: [dataclasses.asdict(c) for c in calls]

# 1. Extrapolated from batch 2 and 3 to 5 against a trace at 5 (micro ViT, training and inference).
for fmt in ("dense", "diag16"):
    for phase in ("train", "infer"):
        two, t2 = sm.trace("vit-b16", fmt, 2, phase, quick=True)
        three, _ = sm.trace("vit-b16", fmt, 3, phase, quick=True)
        five, t5 = sm.trace("vit-b16", fmt, 5, phase, quick=True)
        out[f"extra {fmt} {phase}"] = dict(got=as_dicts(sm.extrapolate(two, three, 5)),
                                          want=as_dicts([c for c in five if c.bytes >= sm.MIN_BYTES]),
                                          tokens=[t2, t5], all2=as_dicts(two))
try:
    two, _ = sm.trace("vit-b16", "dense", 2, "train", quick=True)
    sm.extrapolate(two, two[:-1], 5)
    out["mismatch"] = "no error"
except ValueError as e:
    out["mismatch"] = str(e)

# 2. What single ops are recorded as.
t = sm.Trace()
a, b, bias = torch.randn(5, 7), torch.randn(7, 3), torch.randn(3)
a3, b3, w = torch.randn(2, 5, 7), torch.randn(2, 7, 3), b.t().contiguous()
q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8)
with torch.inference_mode(), t:
    torch.mm(a, b)
    torch.bmm(a3, b3)
    F.linear(a, w, bias)
    F.dropout(a, 0.5, training=False)
    F.scaled_dot_product_attention(q, k, k)
    torch.ops.aten.gelu(a)
out["single"] = as_dicts(t.calls)
try:
    sm._sparse_call("diag_matmul_relu", (a,), a)
    out["unknown"] = "no error"
except ValueError as e:
    out["unknown"] = str(e)

# 3. The step's time is the sum of its ops' (a stub layer model: 7 us per product).
calls, _ = sm.calls_at("vit-b16", "diag16", 4, "train", quick=True)
stub = lambda fmt, product, n_in, n_out, tokens, dtype: {"H100": 7e-6, "H200": 7e-6}
st = sm.step_time(calls, "diag16", "H200", stub)
out["stub"] = dict(step=st, sum=sum(sm.call_time(c, "diag16", "H200", stub) for c in calls),
                   sparse=[(c.product, c.n_in, c.n_out, c.tokens) for c in calls if c.kind == "sparse"])
gelu = sm.Call("diag_matmul_gelu", "sparse", 0, product="fwd", tokens=10, n_in=32, n_out=64, aux_bytes=4.5e6)
out["aux"] = sm.call_time(gelu, "diag16-fused", "H200", stub)
out["csr"] = sm.csr_floor(1000, 64, 32, 10, "bfloat16", static.GPUS["H200"])

fused, _ = sm.trace("vit-b16", "diag16-fused", 2, "train", quick=True)
out["fused"] = as_dicts([c for c in fused if c.kind == "sparse"])

# 4. The whole chain, compiled (micro ViT, batch 4): dense, diag16 (and its fused MLP), the CSR floor.
out["rows"] = sm.rows(("dense", "diag16", "diag16-fused", "csr"), (("train", 4), ("infer", 1)), quick=True,
                      log=lambda m: None)
print("RESULT" + json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=1200)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT"):])


@pytest.mark.parametrize("key", ["extra dense train", "extra dense infer", "extra diag16 train",
                                 "extra diag16 infer"])
def test_extrapolation_in_the_batch_matches_a_trace_there(probe, key):
    got, want = probe[key]["got"], probe[key]["want"]
    assert [c["name"] for c in got] == [c["name"] for c in want]
    for g, w in zip(got, want):
        for f in ("bytes", "flops", "tokens", "nnz"):
            assert g[f] == pytest.approx(w[f], rel=1e-12, abs=1e-9), (g["name"], f)
    assert probe[key]["tokens"] == [2 * 17, 5 * 17]  # 16 patches + the class token an image
    # the rule has something to extrapolate: activations grow with the batch
    assert sum(c["bytes"] for c in got) > sum(c["bytes"] for c in probe[key]["all2"])


def test_extrapolation_refuses_other_ops(probe):
    assert "not affine in the batch" in probe["mismatch"]


def test_the_trace_records_each_sparse_product_once_a_layer(probe):
    calls = probe["extra diag16 train"]["all2"]  # batch 2, every op (none left out for size)
    sparse = sorted((c["product"], c["n_in"], c["n_out"]) for c in calls if c["kind"] == "sparse")
    layers = [(32, 96), (32, 32), (32, 64), (64, 32)]  # micro: qkv, attention out, fc1, fc2; depth 1
    assert sparse == sorted((p, i, o) for p in ("fwd", "dx", "dw") for i, o in layers)
    assert all(c["tokens"] == 2 * 17 for c in calls if c["kind"] == "sparse")
    dense = probe["extra dense train"]["all2"]
    # forward: the 4 block linears, patch embedding and head; backward: dx and dW of each
    # (the patch embedding's input needs no gradient)
    assert sum(c["kind"] == "gemm" for c in dense) == 6 + 6 + 5
    assert sum(c["kind"] == "gemm" for c in calls) == 2 + 2 + 1


def test_the_fused_mlp_is_one_op_forward_and_its_backward_products_carry_the_gelu_tensor(probe):
    calls = [(c["name"], c["product"], c["n_in"], c["n_out"], c["aux_bytes"]) for c in probe["fused"]]
    T = 2 * 17
    assert ("fused_diag_mlp", "mlp", 32, 64, 0) in calls  # dim -> hidden (-> dim)
    assert ("diag_matmul_gelu", "fwd", 32, 64, T * 64 * 2) in calls  # h and gelu(h): bf16 [T, 64] beside h
    assert ("diag_dx_gelu_grad", "dx", 64, 32, T * 64 * 2) in calls  # reads h
    assert sum(c[0] == "fused_diag_mlp" for c in calls) == 1
    assert not any(c[0] in ("diag_matmul", "diag_dx") and c[2:4] in ((32, 64), (64, 32)) and c[1] == "fwd"
                   for c in calls)  # the MLP's own forward products run inside the fused op


def test_single_ops_are_charged_by_kind(probe):
    calls = probe["single"]
    # F.linear under inference_mode is taken apart (addmm); dropout at eval runs nothing
    assert [(c["name"], c["kind"]) for c in calls] == [
        ("mm", "gemm"), ("bmm", "gemm"), ("addmm", "gemm"),
        ("_scaled_dot_product_flash_attention_for_cpu", "attention"), ("gelu", "memory")]
    by = {c["name"]: c for c in calls}
    assert by["mm"]["flops"] == 2 * 5 * 7 * 3
    assert by["bmm"]["flops"] == 2 * 2 * 5 * 7 * 3
    assert by["addmm"]["flops"] == 2 * 5 * 7 * 3
    assert by["mm"]["bytes"] == (5 * 7 + 7 * 3 + 5 * 3) * 4
    sdpa = [c for c in calls if c["kind"] == "attention"]
    assert len(sdpa) == 1 and sdpa[0]["flops"] == 4 * 1 * 2 * 4 * 6 * 8
    assert by["gelu"]["kind"] == "memory" and by["gelu"]["bytes"] == 2 * 5 * 7 * 4


def test_an_unmodelled_custom_op_is_named(probe):
    assert "alwayssparse::diag_matmul_relu" in probe["unknown"]


def test_the_step_time_is_the_sum_of_its_ops(probe):
    s = probe["stub"]
    assert s["step"]["total"] == pytest.approx(s["sum"], rel=1e-12)
    assert s["step"]["sparse"] == pytest.approx(7e-6 * 12, rel=1e-12)  # 4 layers x 3 products
    assert s["step"]["total"] == pytest.approx(sum(s["step"][k] for k in ("sparse", "gemm", "attention", "memory")))


def test_a_gelu_epilogue_pays_its_second_tensor(probe):
    assert probe["aux"] == pytest.approx(7e-6 + 4.5e6 / probe["consts"]["hbm"], rel=1e-12)


def test_csr_floor_by_hand(probe):
    c = probe["consts"]
    e, acts = 2, 10 * (64 + 32) * 2
    spmm = max(2 * 1000 * 10 / c["fp32"], (1000 * (e + 4) + 4 * 33 + acts) / c["hbm"])
    assert probe["csr"] == pytest.approx(spmm + c["cublas"] + 2 * acts / c["hbm"] + 2 * c["torch_op"], rel=1e-12)


def test_the_chain_compiles_and_models_a_micro_step(probe):
    rows = {(r["phase"], r["format"]): r for r in probe["rows"]}
    assert not [r for r in probe["rows"] if r.get("error")], probe["rows"]
    for phase in ("train", "infer"):
        assert rows[(phase, "diag16-fused")]["sparse_ms"] > 0
        dense, diag = rows[(phase, "dense")], rows[(phase, "diag16")]
        assert dense["model_not_measured_x_dense_h200"] == 1
        assert diag["sparse_ms"] > 0 and dense["sparse_ms"] == 0 and dense["gemm_ms"] > diag["gemm_ms"]
        for r in (dense, diag, rows[(phase, "csr")], rows[(phase, "diag16-fused")]):
            assert r["model_not_measured_h200_ms"] == pytest.approx(
                sum(r[f"{k}_ms"] for k in ("sparse", "gemm", "attention", "memory")), abs=4e-6)
        assert diag["model_not_measured_x_dense_h200"] == pytest.approx(
            dense["model_not_measured_h200_ms"] / diag["model_not_measured_h200_ms"], rel=1e-3)
