"""models/gpt.py: causal next-token logits, tied head, presets, sampling, always-sparse build."""
import pytest
import torch

import kernels
from models.gpt import GPT_PRESETS, GPT, GPTConfig
from models.transformer import sparse_layer_shapes

from .test_vit import RecordAllocations, recording_factory, sparse_factory


@pytest.mark.parametrize("kind", [None, kernels.SparseLinear, kernels.FanInLinear])
def test_gpt_is_causal_a_later_token_never_changes_an_earlier_logit(kind):
    torch.manual_seed(0)
    cfg = GPTConfig.preset("micro", vocab_size=50, depth=2)
    model = (GPT(cfg) if kind is None else GPT(cfg, linear=sparse_factory(0.3, kind))).eval()
    ids = torch.randint(0, 50, (2, 17))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 50, (2, 8))
    a, b = model(ids), model(changed)
    assert a.shape == (2, 17, 50)
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_gpt_head_is_the_token_embedding_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", vocab_size=50)).eval()   # eval: no dropout
    ids = torch.randint(0, 50, (2, 11))
    logits = model(ids)
    h = model.norm(model.blocks[0](model.tok_embed(ids) + model.pos_embed(torch.arange(11))))
    torch.testing.assert_close(logits, h @ model.tok_embed.weight.t())
    assert not any("head" in n for n, _ in model.named_parameters())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, 50, (22,))).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gpt_with_sparse_layers_never_allocates_a_dense_block_weight():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=64, max_len=32)
    shapes = sparse_layer_shapes(GPT, cfg)
    assert sorted(shapes) == sorted(f"blocks.{i}.{p}" for i in range(2) for p in ("attn.qkv", "attn.out", "mlp.fc1", "mlp.fc2"))
    linear, largest = recording_factory(sparse_factory(0.1, kernels.SparseLinear))
    model = GPT(cfg, linear=linear)
    assert all(largest[n] < 0.5 * o * i for n, (o, i) in shapes.items()), largest
    with RecordAllocations() as step:
        model(torch.randint(0, 64, (2, 32))).sum().backward()
    block_shapes = set(shapes.values())
    assert not (block_shapes | {(i, o) for o, i in block_shapes}) & set(step.shapes)


def test_gpt_presets_include_gpt2_small_and_reject_bad_input():
    s = GPTConfig.preset("small")
    assert (s.dim, s.depth, s.heads, s.mlp_dim, s.vocab_size, s.max_len) == (768, 12, 12, 3072, 50257, 1024)
    assert len(sparse_layer_shapes(GPT, s)) == 48 and "tiny" in GPT_PRESETS
    with pytest.raises(ValueError, match="unknown GPT preset"):
        GPTConfig.preset("xl")
    with pytest.raises(ValueError, match="exceeds max_len=64"):
        GPT(GPTConfig.preset("micro", vocab_size=10))(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="heads=3 must divide dim=32"):
        GPT(GPTConfig.preset("micro", heads=3))
    with pytest.raises(ValueError, match="causal attention takes no key_mask"):
        GPT(GPTConfig.preset("micro", vocab_size=10)).blocks[0](torch.zeros(1, 3, 32), torch.ones(1, 3, dtype=torch.bool))


def test_generate_appends_sampled_tokens_reproducibly_and_checks_its_arguments():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("micro", vocab_size=30, max_len=16)).eval()
    start = torch.zeros(2, 3, dtype=torch.long)
    a = model.generate(start, 20, generator=torch.Generator().manual_seed(1))   # past max_len: the context slides
    b = model.generate(start, 20, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 23) and torch.equal(a, b) and torch.equal(a[:, :3], start)
    assert int(a.max()) < 30
    greedy = model.generate(start, 5, top_k=1)
    want = start
    for _ in range(5):
        want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, want)
    for kwargs, match in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=1, temperature=0), "temperature"),
                          (dict(max_new_tokens=1, top_k=0), "top_k")]:
        with pytest.raises(ValueError, match=match):
            model.generate(start, **kwargs)
