"""models/bert.py: masked-LM logits, padding mask, tied decoder, presets, always-sparse build."""
import pytest
import torch

import kernels
from models.bert import BERT_PRESETS, Bert, BertConfig
from models.transformer import sparse_layer_shapes

from .test_vit import RecordAllocations, recording_factory, sparse_factory


def test_bert_gives_vocab_logits_and_ties_the_decoder_to_the_embedding():
    torch.manual_seed(0)
    model = Bert(BertConfig.preset("micro", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 17))
    assert model(ids).shape == (2, 17, 50)
    model(ids).sum().backward()
    assert model.tok_embed.weight.grad is not None
    assert not any("decoder" in n for n, _ in model.named_parameters())
    predict = torch.rand(2, 17) < 0.3
    torch.testing.assert_close(model(ids, predict=predict), model(ids)[predict])


def test_bert_padding_does_not_change_the_real_tokens():
    torch.manual_seed(0)
    model = Bert(BertConfig.preset("micro", vocab_size=50)).eval()
    ids = torch.randint(0, 50, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 4)], dim=1)
    torch.testing.assert_close(model(padded, mask)[:, :9], model(ids), atol=1e-5, rtol=1e-5)


def test_bert_with_sparse_layers_never_allocates_a_dense_block_weight():
    # The LM transform is a dense dim x dim Linear like attn.out, so sizes are checked per
    # factory call: building a sparse layer allocates less than its dense weight.
    torch.manual_seed(0)
    cfg = BertConfig.preset("tiny", vocab_size=64, max_len=32)
    shapes = sparse_layer_shapes(Bert, cfg)
    linear, largest = recording_factory(sparse_factory(0.1, kernels.SparseLinear))
    model = Bert(cfg, linear=linear)
    assert set(largest) == set(shapes)
    assert all(largest[n] < 0.5 * o * i for n, (o, i) in shapes.items()), largest  # density 0.1 + sampling slack
    with RecordAllocations() as step:
        model(torch.randint(0, 64, (2, 32))).sum().backward()
    block_shapes = {s for s in shapes.values() if s != (cfg.dim, cfg.dim)}   # dim x dim: the LM transform
    assert not (block_shapes | {(i, o) for o, i in block_shapes}) & set(step.shapes)


def test_bert_presets_include_base_and_reject_unknown_names():
    b = BertConfig.preset("base")
    assert (b.dim, b.depth, b.heads, b.mlp_dim, b.vocab_size) == (768, 12, 12, 3072, 30522)
    assert len(sparse_layer_shapes(Bert, b)) == 48
    assert "tiny" in BERT_PRESETS
    with pytest.raises(ValueError, match="unknown BERT preset"):
        BertConfig.preset("giant")
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        Bert(BertConfig.preset("micro", vocab_size=10))(torch.zeros(1, 65, dtype=torch.long))
