"""models/sparsify.py: swapping nn.Linear layers of any model (Hugging Face transformers
included) by name, output equivalence with a full mask, and the always-sparse meta build."""
import pytest
import torch
from torch import nn

import kernels
from models.bert import Bert, BertConfig
from models.sparsify import BLOCK_LINEARS, materialize, sparsify
from models.vit import ViT, ViTConfig

transformers = pytest.importorskip("transformers")

from .test_vit import RecordAllocations  # noqa: E402


def hf_bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg)


def hf_vit():
    cfg = transformers.ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=10)
    return transformers.ViTForImageClassification(cfg)


def full_mask(kind):
    """make_layer for sparsify: the same weight in a sparse format with every entry active."""
    def make(name, lin):
        w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
        if kind == "diag":
            out_f, in_f = w.shape
            return kernels.DiagLinear.from_dense(w, torch.arange(max(out_f, in_f)), b)
        mask = torch.ones_like(w, dtype=torch.bool)
        return (kernels.SparseLinear if kind == "sparse" else kernels.FanInLinear).from_dense(w, mask, b)
    return make


@pytest.mark.parametrize("kind", ["sparse", "fanin", "diag"])
def test_full_mask_swap_of_hf_bert_gives_the_dense_outputs(kind):
    torch.manual_seed(0)
    model = hf_bert().eval()
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    names = sparsify(model, full_mask(kind), include=BLOCK_LINEARS)
    assert len(names) == 12 and all(".layer." in n for n in names)
    assert isinstance(model.cls.predictions.decoder, nn.Linear), "the LM head stays dense"
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sparse", "fanin", "diag"])
def test_full_mask_swap_of_hf_vit_gives_the_dense_outputs_and_gradients(kind):
    torch.manual_seed(0)
    dense = hf_vit().eval()
    x = torch.randn(3, 1, 28, 28)
    swapped = hf_vit().eval()
    swapped.load_state_dict(dense.state_dict())
    names = sparsify(swapped, full_mask(kind), include=BLOCK_LINEARS)
    assert len(names) == 12 and "classifier" not in names
    want, got = dense(pixel_values=x).logits, swapped(pixel_values=x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(swapped.vit.embeddings.cls_token.grad, dense.vit.embeddings.cls_token.grad,
                               atol=1e-4, rtol=1e-4)
    for path in ("layers.0.mlp.fc1", "layers.1.attention.q_proj"):
        w_grad = dense.vit.get_submodule(path).weight.grad
        layer = swapped.vit.get_submodule(path)
        rows, cols = layer.coords()   # in the order of values.reshape(-1)
        torch.testing.assert_close(layer.values.grad.reshape(-1), w_grad[rows.long(), cols.long()],
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("build", [lambda: ViT(ViTConfig.preset("micro")), lambda: Bert(BertConfig.preset("micro", vocab_size=40))])
def test_full_mask_swap_of_our_models_gives_the_dense_outputs(build):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 1, 28, 28) if isinstance(model, ViT) else torch.randint(0, 40, (2, 11))
    with torch.no_grad():
        want = model(x)
        assert len(sparsify(model, full_mask("sparse"), include=BLOCK_LINEARS)) == 4
        torch.testing.assert_close(model(x), want, atol=2e-5, rtol=1e-5)


def test_include_and_exclude_choose_the_layers():
    model = hf_bert()
    names = sparsify(model, lambda n, lin: kernels.SparseLinear(lin.in_features, lin.out_features, 0.5),
                     include=r"\.attention\.", exclude=lambda name, m: name.endswith("output.dense"))
    assert names == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key", "value")]
    assert isinstance(model.bert.encoder.layer[0].attention.output.dense, nn.Linear)
    assert sparsify(model, lambda n, lin: lin, include="no such layer") == []
    with pytest.raises(TypeError, match="include/exclude must be"):
        sparsify(model, lambda n, lin: lin, include=3)
    with pytest.raises(TypeError, match="make_layer must return an nn.Module"):
        sparsify(model, lambda n, lin: None)


def test_hf_bert_built_on_meta_is_sparsified_without_a_dense_block_weight():
    torch.manual_seed(0)
    with RecordAllocations() as rec:
        with torch.device("meta"):
            model = hf_bert()
        sparsify(model, lambda n, lin: kernels.SparseLinear(lin.in_features, lin.out_features, 0.1, device="cpu"),
                 include=BLOCK_LINEARS)
        materialize(model, "cpu", init=model._init_weights)
    model.tie_weights()
    assert not [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(model.bert.embeddings.position_ids[0, :5], torch.arange(5))
    real = [(s, p) for s, d, p in zip(rec.shapes, rec.devices, rec.ptrs) if d != "meta"]
    assert not {(96, 48), (48, 96)} & {s for s, _ in real}, "a dense MLP weight was allocated"
    # 48 x 48: the only real one is the dense LM-head transform, not q / k / v / attention out.
    assert len({p for s, p in real if s == (48, 48)}) == 1
    out = model(input_ids=torch.randint(0, 97, (2, 9)), labels=torch.randint(0, 97, (2, 9)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.bert.encoder.layer[0].intermediate.dense.values.grad is not None


# Causal LMs: GPT-2's block projections are transformers' Conv1D (weight [in, out]) and its LM
# head is tied to the token embedding; a Llama-style model has plain nn.Linear projections
# (grouped-query attention: k / v narrower than q) and an untied head.

def hf_gpt2(vocab=97, width=48):
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


GPT2_BLOCK = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
LLAMA_BLOCK = [f"model.layers.{i}.{p}" for i in range(2)
               for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def dense_weight_grad(module):
    """The gradient of a dense layer's W [out, in] (Conv1D stores W^T)."""
    g = module.weight.grad
    return g if isinstance(module, nn.Linear) else g.t()


@pytest.mark.parametrize("kind", ["sparse", "fanin", "diag"])
@pytest.mark.parametrize("build, block, embedding", [(hf_gpt2, GPT2_BLOCK, "transformer.wte"),
                                                     (hf_llama, LLAMA_BLOCK, "model.embed_tokens")],
                         ids=["gpt2", "llama"])
def test_full_mask_swap_of_hf_causal_lms_gives_the_dense_outputs_and_gradients(build, block, embedding, kind):
    torch.manual_seed(0)
    dense = build().eval()
    swapped = build().eval()
    swapped.load_state_dict(dense.state_dict())
    names = sparsify(swapped, full_mask(kind), include=BLOCK_LINEARS)
    assert names == block
    assert all(isinstance(swapped.get_submodule(n), kernels.SparseLayer) for n in block)
    ids = torch.randint(0, 97, (2, 13))
    want, got = dense(input_ids=ids).logits, swapped(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    want.square().sum().backward()
    got.square().sum().backward()
    torch.testing.assert_close(swapped.get_submodule(embedding).weight.grad, dense.get_submodule(embedding).weight.grad,
                               atol=1e-4, rtol=1e-4)
    for name in (block[0], block[3], block[-1]):
        layer = swapped.get_submodule(name)
        rows, cols = layer.coords()   # in the order of values.reshape(-1)
        w_grad = dense_weight_grad(dense.get_submodule(name))
        torch.testing.assert_close(layer.values.grad.reshape(-1), w_grad[rows.long(), cols.long()], atol=1e-4, rtol=1e-4)
        if layer.bias is not None:   # GPT-2's projections have biases, Llama's none
            torch.testing.assert_close(layer.bias.grad, dense.get_submodule(name).bias.grad, atol=1e-4, rtol=1e-4)


def test_conv1d_is_given_to_make_layer_as_a_linear_view_of_its_transposed_weight():
    model = hf_gpt2()
    conv = model.transformer.h[0].attn.c_attn   # Conv1D: weight [48, 144] = [in, out]
    seen = {}

    def make(name, lin):
        seen[name] = lin
        return lin

    sparsify(model, make, include=r"h\.0\.attn\.c_attn$")
    lin = seen["transformer.h.0.attn.c_attn"]
    assert type(lin) is nn.Linear and (lin.in_features, lin.out_features) == (48, 144)
    assert lin.weight.shape == (144, 48) and lin.weight.data_ptr() == conv.weight.data_ptr()   # a view, no copy
    assert torch.equal(lin.weight, conv.weight.t()) and lin.bias is conv.bias
    x = torch.randn(3, 48)
    torch.testing.assert_close(lin(x), conv(x))


def test_tied_lm_head_is_left_dense_with_a_warning_unless_asked():
    model = hf_gpt2()
    make = lambda n, lin: kernels.SparseLinear(lin.in_features, lin.out_features, 0.5)  # noqa: E731
    with pytest.warns(UserWarning, match=r"lm_head.weight is tied to transformer.wte.weight"):
        names = sparsify(model, make)
    assert names == GPT2_BLOCK and names.tied == ["lm_head"]
    assert names.kept_dense == {"lm_head": "tied to transformer.wte.weight"}
    assert model.lm_head.weight is model.transformer.wte.weight, "the tie holds"
    assert "1 tied (skipped: lm_head)" in names.summary()
    model = hf_gpt2()
    names = sparsify(model, make, include_tied=True)
    assert names == GPT2_BLOCK + ["lm_head"] and isinstance(model.lm_head, kernels.SparseLinear)


def test_report_counts_the_replaced_share_and_warns_when_most_of_the_model_stays_dense():
    model = hf_llama()
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for n in LLAMA_BLOCK for p in model.get_submodule(n).parameters())
    names = sparsify(model, lambda n, lin: kernels.SparseLinear(lin.in_features, lin.out_features, 0.5),
                     include=BLOCK_LINEARS)
    assert (names.replaced_parameters, names.total_parameters) == (block, total)
    assert names.share == pytest.approx(block / total) and 0.5 < names.share < 1
    assert names.kept_dense == {"lm_head": "not matched"}
    # vocabulary 2000 x width 32: the embedding and the head outweigh the blocks
    big_vocab = hf_gpt2(vocab=2000, width=32)
    with pytest.warns(UserWarning, match=r"replaced 8 layer\(s\) holding 25,152 of 91,520 parameters \(27\.5%\)"):
        names = sparsify(big_vocab, lambda n, lin: kernels.SparseLinear(lin.in_features, lin.out_features, 0.5),
                         include=BLOCK_LINEARS)
    assert names.share < 0.5


@pytest.mark.parametrize("method", ["rigl", "srigl", "set", "dynadiag"])
@pytest.mark.parametrize("build", [hf_gpt2, hf_llama], ids=["gpt2", "llama"])
def test_sparsifier_steps_on_sparsified_hf_causal_lms_keep_each_layers_budget(build, method):
    import dst
    torch.manual_seed(0)
    model = build()
    cfg = dst.DSTConfig.for_method(method, sparsity=0.8, delta_t=2, t_end=1.0)
    gen = torch.Generator().manual_seed(0)
    names = sparsify(model, lambda n, lin: dst.make_layer(cfg, lin.in_features, lin.out_features, 0.2, generator=gen),
                     include=BLOCK_LINEARS)
    assert len(names) == (8 if build is hf_gpt2 else 14)
    sparsifier = dst.Sparsifier(model, cfg, total_steps=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: m.mask().clone() for n, m in sparsifier.layers.items()}
    ids = torch.randint(0, 97, (4, 16), generator=gen)
    updates = 0
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        with sparsifier.capture(step):
            model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        updates += sparsifier.step(step, opt) is not None
    assert updates >= (1 if method == "dynadiag" else 3)   # DynaDiag freezes at 0.3 x 8 steps
    if method == "dynadiag":
        assert sparsifier.frozen
    if method == "srigl":   # constant fan-in k = budget // active neurons over the neurons not ablated
        for name, layer in sparsifier.layers.items():
            n_rows = layer.rows.numel()
            assert layer.k == min(layer.in_features, sparsifier.budgets[name] // n_rows), name
            assert layer.nnz() == layer.k * n_rows, name
    else:
        assert {n: m.nnz() for n, m in sparsifier.layers.items()} == sparsifier.budgets
    if method != "dynadiag":   # DynaDiag's stored pattern carries candidates until its freeze
        assert any(not torch.equal(before[n], m.mask()) for n, m in sparsifier.layers.items())


@pytest.mark.parametrize("build, shapes", [(hf_gpt2, {(48, 144), (144, 48), (48, 48), (48, 192), (192, 48)}),
                                           (hf_llama, {(48, 48), (24, 48), (48, 24), (96, 48), (48, 96)})],
                         ids=["gpt2", "llama"])
def test_hf_causal_lm_built_on_meta_is_sparsified_without_a_dense_block_weight(build, shapes):
    torch.manual_seed(0)
    with RecordAllocations() as rec:
        with torch.device("meta"):
            model = build()
        names = sparsify(model, lambda n, lin: kernels.SparseLinear(lin.in_features, lin.out_features, 0.1, device="cpu"),
                         include=BLOCK_LINEARS)
        materialize(model, "cpu", init=model._init_weights)
    model.tie_weights()
    assert len(names) in (8, 14)
    assert not [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    real = {s for s, d in zip(rec.shapes, rec.devices) if d != "meta"}
    assert not shapes & real, f"a dense block weight was allocated: {shapes & real}"
    out = model(input_ids=torch.randint(0, 97, (2, 9)), labels=torch.randint(0, 97, (2, 9)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(model.get_submodule(n).values.grad is not None for n in names)
