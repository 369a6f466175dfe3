import math

import pytest
import torch
import torch.nn.functional as F

from vlp.models.embed import PatchEmbed, TextEmbed, sincos_2d
from vlp.models.encoder import QuickGELU, Transformer, build_attention_mask


def test_causal_mask_explicit():
    m = build_attention_mask("causal", 3)
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert m.shape == (1, 1, 3, 3) and torch.equal(m[0, 0], expected)


def test_bidirectional_with_padding_explicit():
    assert build_attention_mask("bidirectional", 4) is None
    pad = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    m = build_attention_mask("bidirectional", 4, padding_mask=pad)
    assert m.shape == (2, 1, 1, 4)
    full = m.expand(2, 1, 4, 4)
    assert torch.equal(full[0, 0], torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.bool))
    assert full[1].all()


def test_prefix_mask_explicit():
    # prefix of 2 (e.g. image tokens), then causal text
    m = build_attention_mask("prefix", 4, prefix_len=2)[0, 0]
    expected = torch.tensor([[1, 1, 0, 0],
                             [1, 1, 0, 0],
                             [1, 1, 1, 0],
                             [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    # per-sample prefix lengths and padding together
    m = build_attention_mask("prefix", 3, prefix_len=torch.tensor([1, 3]),
                             padding_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    assert torch.equal(m[0, 0], torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    assert m[1, 0].all()


def _reference_attention(x, block, mask):
    """Attention written out by hand: softmax(QK^T/sqrt(d) masked) V."""
    attn = block.attn
    B, L, C = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).split(C, dim=-1)
    q, k, v = (t.view(B, L, h, C // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // h)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.proj(y.transpose(1, 2).reshape(B, L, C))


@pytest.mark.parametrize("kind", ["bidirectional", "causal", "prefix"])
def test_attention_matches_reference(kind):
    torch.manual_seed(0)
    model = Transformer(width=32, layers=1, heads=4)
    x = torch.randn(2, 5, 32)
    pad = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = build_attention_mask(kind, 5, padding_mask=pad, prefix_len=2)
    block = model.blocks[0]
    got = block.attn(block.ln_1(x), mask)
    want = _reference_attention(block.ln_1(x), block, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak():
    """Changing padded tokens must not change the real tokens' outputs."""
    torch.manual_seed(0)
    model = Transformer(width=32, layers=2, heads=4).eval()
    x = torch.randn(1, 6, 32)
    pad = torch.tensor([[1, 1, 1, 1, 0, 0]])
    mask = build_attention_mask("bidirectional", 6, padding_mask=pad)
    y1 = model(x, mask)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(1, 2, 32) * 10
    y2 = model(x2, mask)
    torch.testing.assert_close(y1[:, :4], y2[:, :4])


def test_causal_flag_equals_causal_mask_and_no_future_leak():
    torch.manual_seed(0)
    model = Transformer(width=32, layers=2, heads=2).eval()
    x = torch.randn(2, 7, 32)
    a = model(x, is_causal=True)
    b = model(x, build_attention_mask("causal", 7))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    torch.testing.assert_close(model(x2, is_causal=True)[:, :5], a[:, :5])


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    model = Transformer(width=32, layers=3, heads=4, act="quick_gelu")
    x = torch.randn(2, 5, 32)
    model(x).square().sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.grad_checkpointing = True
    model(x).square().sum().backward()
    for a, b in zip(g1, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


def test_quick_gelu_and_norm_eps():
    x = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    model = Transformer(width=8, layers=1, heads=2, norm_eps=1e-3)
    assert model.ln_f.eps == 1e-3 and model.blocks[0].ln_1.eps == 1e-3


def test_patch_embed_shapes_and_sincos():
    pe = PatchEmbed(32, 8, 16, pos_embed="sincos")
    out = pe(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 1 + 16, 16)
    table = sincos_2d(16, 4)
    # patch (row 1, col 2) -> index 6; first half encodes the row, second half the column
    assert torch.allclose(table[6, 0], torch.tensor(math.sin(1.0)))
    assert torch.allclose(table[6, 8], torch.tensor(math.sin(2.0)))
    assert torch.allclose(table[6, 4], torch.tensor(math.cos(1.0)))
    # the patch tokens are the conv over non-overlapping patches, row-major
    img = torch.randn(1, 3, 32, 32)
    tokens = pe(img)[0, 1:] - pe.pos_embed[0, 1:]
    patch = img[0, :, 8:16, 16:24]  # row 1, col 2
    manual = (pe.proj.weight * patch).sum(dim=(1, 2, 3)) + pe.proj.bias
    torch.testing.assert_close(tokens[6], manual, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="32x32"):
        pe(torch.randn(1, 3, 16, 16))


def test_text_embed():
    te = TextEmbed(50, 16, 8)
    ids = torch.tensor([[1, 2, 3]])
    out = te(ids)
    torch.testing.assert_close(out[0, 1], te.token_embed.weight[2] + te.pos_embed[0, 1])
    with pytest.raises(ValueError, match="context_length"):
        te(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kind", ["bidirectional", "causal", "prefix"])
def test_math_attention_equals_sdpa(kind):
    """The written-out attention used for bf16 on CPU has SDPA's semantics (checked in fp32),
    including a query row whose keys are all masked (zeros, not NaN)."""
    from vlp.models.encoder import attention_math

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    pad = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = build_attention_mask(kind, 6, padding_mask=pad, prefix_len=2)
    torch.testing.assert_close(attention_math(q, k, v, mask),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_math(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               atol=1e-5, rtol=1e-5)
    empty = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    empty[0, 0, 2] = False  # query 2 of sample 0 may attend nothing
    out = attention_math(q, k, v, empty)
    assert torch.equal(out[0, :, 2], torch.zeros(3, 8)) and torch.isfinite(out).all()


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(0)
    model = Transformer(width=64, layers=2, heads=4).eval()
    x = torch.randn(2, 9, 64)
    ref = model(x, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, is_causal=True)
    assert (got.float() - ref).abs().max() < 0.1
