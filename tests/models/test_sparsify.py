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
