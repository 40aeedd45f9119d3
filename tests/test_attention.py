"""LocalAttention against dense attention with an explicit mask (reference math)."""

import pytest
import torch
import torch.nn.functional as F

from titans_pytorch.attention import LocalAttention


def dense_reference(attention, x, allowed):
    """Full attention over the whole sequence with a (n, n) boolean mask."""
    q, k, v, normed = attention.project(x, 0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attention.to_out(out, normed)


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("pieces", [(23,), (5, 1, 10, 7), (1,) * 23])
def test_local_attention_equals_masked_dense_attention(float64, sliding, pieces):
    torch.manual_seed(0)
    window = 6
    attention = LocalAttention(dim=16, heads=2, dim_head=8, segment_len=window, sliding=sliding)
    x = torch.randn(2, 23, 16)
    query, key = torch.arange(23)[:, None], torch.arange(23)[None, :]
    if sliding:
        allowed = (key <= query) & (key > query - window)
    else:
        allowed = (key <= query) & (key // window == query // window)
    expected = dense_reference(attention, x, allowed)

    outputs, cache, position = [], None, 0
    for length in pieces:  # streaming in pieces with the cache gives the same result
        out, cache = attention(x[:, position : position + length], position, cache)
        outputs.append(out)
        position += length
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-12, rtol=0)
    assert cache.keys.shape[2] <= window - 1
