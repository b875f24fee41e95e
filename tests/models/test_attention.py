"""models/attention.py: torch's scaled_dot_product_attention and our bmm path, against fp64;
which path runs where; the qkv split's packed gradient."""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from models import attention
from models.attention import _SplitHeads, backend_for, self_attention
from models.dropout import keep_mask
from models.vit import ViT, ViTConfig

SHAPES = [  # B, N, heads, D, mask
    (1, 1, 1, 4, None),
    (3, 7, 2, 16, "key_mask"),
    (2, 33, 3, 8, "causal"),
    (2, 63, 4, 32, None),
    (1, 123, 2, 64, "key_mask"),
    (2, 197, 12, 64, None),
]


def _inputs(B, N, heads, D, mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3 * heads * D, generator=g, dtype=torch.float64) * 1.5
    key_mask = None
    if mask == "key_mask":
        key_mask = torch.rand(B, N, generator=g) < 0.7
        key_mask[:, 0] = True   # every sequence has a real token
    return qkv, key_mask, mask == "causal", torch.randn(B, N, heads * D, generator=g, dtype=torch.float64)


def reference(qkv, heads, key_mask=None, causal=False, keep=None, keep_scale=1.0):
    """Attention written out in plain torch; ``keep`` [B, H, N, N] the dropout's keep mask, kept
    probabilities scaled by ``keep_scale``."""
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=heads)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    N = qkv.shape[1]
    if causal:
        s = s.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    if keep is not None:
        p = p * keep * keep_scale
    return rearrange(p @ v, "b h n d -> b n (h d)")


def _output_and_grad(fn, qkv, dy):
    x = qkv.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("B, N, heads, D, mask", SHAPES)
def test_bmm_path_in_fp64_is_attention_and_its_qkv_gradient(B, N, heads, D, mask):
    qkv, key_mask, causal, dy = _inputs(B, N, heads, D, mask)
    y, g = _output_and_grad(lambda x: self_attention(x, heads, key_mask, causal, backend="bmm"), qkv, dy)
    y_ref, g_ref = _output_and_grad(lambda x: reference(x, heads, key_mask, causal), qkv, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert g.shape == qkv.shape and g.is_contiguous()


def _relative(a, ref):
    return ((a.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("B, N, heads, D, mask", SHAPES)
def test_bmm_path_in_bf16_errs_at_most_twice_torchs_flash_kernel(B, N, heads, D, mask):
    """bf16 output and gradient against fp64: within 2x torch's own error at bf16 (its CPU flash
    kernel keeps the scores in fp32; ours rounds them to bf16) + 1e-3."""
    qkv, key_mask, causal, dy = _inputs(B, N, heads, D, mask)
    y_ref, g_ref = _output_and_grad(lambda x: reference(x, heads, key_mask, causal), qkv, dy)
    errors = {}
    for backend in ("sdpa", "bmm"):
        y, g = _output_and_grad(lambda x: self_attention(x, heads, key_mask, causal, backend=backend),
                                qkv.bfloat16(), dy.bfloat16())
        assert y.dtype == g.dtype == torch.bfloat16
        errors[backend] = (_relative(y, y_ref), _relative(g, g_ref))
    for ours, torchs in zip(errors["bmm"], errors["sdpa"]):
        assert ours <= 2 * torchs + 1e-3, errors


@pytest.mark.parametrize("mask", [None, "key_mask", "causal"])
def test_dropout_keeps_the_drawn_mask_in_forward_and_backward(mask):
    """The keep mask is models.dropout.keep_mask((B, H, N, N), p) from the default generator, the
    same in the backward as in the forward."""
    B, N, heads, D, p = 2, 19, 3, 8, 0.3
    qkv, key_mask, causal, dy = _inputs(B, N, heads, D, mask, seed=1)
    torch.manual_seed(7)
    y, g = _output_and_grad(lambda x: self_attention(x, heads, key_mask, causal, dropout_p=p, backend="bmm"), qkv, dy)
    torch.manual_seed(7)
    keep, scale = keep_mask((B, heads, N, N), p)
    assert 0 < keep.float().mean() < 1
    y_ref, g_ref = _output_and_grad(lambda x: reference(x, heads, key_mask, causal, keep, scale), qkv, dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_bmm_path_runs_in_inference_mode_and_under_autocast():
    qkv, _, _, _ = _inputs(2, 9, 2, 8, None)
    x = qkv.bfloat16()
    with torch.inference_mode():
        y = self_attention(x, 2, backend="bmm")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_cast = self_attention(x, 2, backend="bmm")
    assert torch.equal(y, y_cast) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference(x.double(), 2), rtol=2e-2, atol=2e-2)


@pytest.fixture
def no_amx(monkeypatch):
    monkeypatch.delenv(attention.BACKEND_ENV, raising=False)
    monkeypatch.setattr(attention, "_amx_cpu", lambda: False)
    return monkeypatch


def test_auto_takes_bmm_for_cpu_bf16_up_to_the_cut_and_torchs_otherwise(no_amx):
    qkv = torch.zeros(2, attention.BMM_MAX_TOKENS, 3 * 8, dtype=torch.bfloat16)
    assert backend_for(qkv) == "bmm"
    assert backend_for(qkv.float()) == "sdpa"
    assert backend_for(torch.zeros(1, attention.BMM_MAX_TOKENS + 1, 24, dtype=torch.bfloat16)) == "sdpa"
    assert backend_for(qkv, "sdpa") == "sdpa" and backend_for(qkv.float(), "bmm") == "bmm"
    no_amx.setattr(attention, "_amx_cpu", lambda: True)   # torch's flash kernel has AMX there: unmeasured
    assert backend_for(qkv) == "sdpa"


@pytest.mark.parametrize("forced, dtype, expected", [("sdpa", torch.bfloat16, "sdpa"), ("bmm", torch.float32, "bmm"),
                                                     ("auto", torch.bfloat16, "bmm")])
def test_the_environment_overrides_auto(no_amx, forced, dtype, expected):
    no_amx.setenv(attention.BACKEND_ENV, forced)
    assert backend_for(torch.zeros(1, 4, 24, dtype=dtype)) == expected


def test_an_unknown_backend_is_refused_naming_the_choices(no_amx):
    with pytest.raises(ValueError, match="unknown attention backend 'flash'.*'sdpa'"):
        backend_for(torch.zeros(1, 4, 24), "flash")
    no_amx.setenv(attention.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="MODELS_ATTENTION='fast' is not an attention backend"):
        backend_for(torch.zeros(1, 4, 24))


@pytest.mark.parametrize("qkv, key_mask, causal, message", [
    (torch.zeros(4, 24), None, False, r"qkv must be \[B, N, 3 \* heads \* D\]"),
    (torch.zeros(1, 4, 25), None, False, r"qkv must be \[B, N, 3 \* heads \* D\] with heads=2"),
    (torch.zeros(1, 4, 24), torch.ones(1, 4), False, r"key_mask must be bool \[B, N\] = \[1, 4\]"),
    (torch.zeros(1, 4, 24), torch.ones(1, 5, dtype=torch.bool), False, r"key_mask must be bool"),
    (torch.zeros(1, 4, 24), torch.ones(1, 4, dtype=torch.bool), True, "causal attention takes no key_mask"),
])
def test_bad_arguments_are_refused_by_name(qkv, key_mask, causal, message):
    with pytest.raises(ValueError, match=message):
        self_attention(qkv, 2, key_mask, causal)


@pytest.mark.parametrize("heads", [0, -1, 2.0])
def test_a_bad_head_count_is_refused_by_name(heads):
    with pytest.raises(ValueError, match="heads must be an int >= 1"):
        self_attention(torch.zeros(1, 4, 24), heads)


def test_a_vit_step_under_autocast_errs_on_the_bmm_path_at_most_twice_torchs(monkeypatch):
    """The same tiny ViT step under bf16 autocast on both paths, against the step in fp64: the
    loss and all gradients (as one vector) of the bmm path err within 2x torch's path + 1e-3,
    and the bmm path is the one "auto" took, once a block."""
    monkeypatch.setattr(attention, "_amx_cpu", lambda: False)
    torch.manual_seed(0)
    net = ViT(ViTConfig.preset("micro"))
    images = torch.randn(3, net.config.channels, net.config.image_size, net.config.image_size)
    labels = torch.tensor([0, 1, 2])
    calls = []
    monkeypatch.setattr(attention._BmmAttention, "apply", lambda *a, _f=attention._BmmAttention.apply:
                        calls.append(1) or _f(*a))

    def step(dtype=None):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is None):
            loss = F.cross_entropy(net(images.to(dtype or torch.float32)).double(), labels)
        loss.backward()
        return loss.item(), torch.cat([p.grad.double().flatten() for p in net.parameters()])

    net.double()
    loss_ref, grad_ref = step(torch.float64)
    net.float()
    errors = {}
    for forced in ("sdpa", "auto"):
        monkeypatch.setenv(attention.BACKEND_ENV, forced)
        loss, grad = step()
        errors[forced] = abs(loss - loss_ref) / loss_ref, _relative(grad, grad_ref)
    assert len(calls) == net.config.depth
    for ours, torchs in zip(errors["auto"], errors["sdpa"]):
        assert ours <= 2 * torchs + 1e-3, errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_split_heads_is_einops_split_and_its_gradient_lands_packed(dtype):
    """q, k, v as einops' split gives them; the backward's one-pass packing equals autograd's
    own gradient bit for bit (a copy, no arithmetic), contiguous in qkv's layout; a head whose
    gradient is unused (k, v here) contributes zeros."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3 * 4 * 6, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    ours = _SplitHeads.apply(x, 4)
    ref = rearrange(x, "b n (three h d) -> three b h n d", three=3, h=4)
    assert all(torch.equal(a, b) and a.shape == (2, 4, 5, 6) for a, b in zip(ours, ref))
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) for t in ours]
    mine, = torch.autograd.grad(sum((a * c).sum() for a, c in zip(ours, w)), x)
    theirs, = torch.autograd.grad(sum((a * c).sum() for a, c in zip(ref, w)), x)
    assert torch.equal(mine, theirs) and mine.is_contiguous() and mine.shape == x.shape
    q_only, = torch.autograd.grad(_SplitHeads.apply(x, 4)[0].sum(), x)
    assert torch.equal(q_only.view(2, 5, 3, -1)[:, :, 1:], torch.zeros(2, 5, 2, 24, dtype=dtype))
    assert torch.equal(q_only.view(2, 5, 3, -1)[:, :, 0], torch.ones(2, 5, 24, dtype=dtype))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: _SplitHeads.apply(t, 4), (x.detach().requires_grad_(),))
