"""LocalAttention against dense attention with an explicit mask (reference math)."""

import pytest
import torch
import torch.nn.functional as F
from rotary_embedding_torch import apply_rotary_emb

from titans_pytorch.attention import LocalAttention


def dense_reference(attention, x, allowed):
    """Full attention over the whole sequence with a (n, n) boolean mask."""
    q, k, v, normed = attention.project(x, 0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    return attention.to_out(out, normed)


def window_problem(sliding, window=6, length=23):
    """A `LocalAttention` over windows (or blocks) of `window`, inputs `(2, length, 16)`, and its
    output by dense attention with the explicit mask."""
    torch.manual_seed(0)
    attention = LocalAttention(dim=16, heads=2, dim_head=8, segment_len=window, sliding=sliding)
    x = torch.randn(2, length, 16)
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]
    if sliding:
        allowed = (key <= query) & (key > query - window)
    else:
        allowed = (key <= query) & (key // window == query // window)
    return attention, x, dense_reference(attention, x, allowed)


@pytest.mark.parametrize("position", [0, 13])
def test_project_rotates_queries_and_keys_at_their_positions(float64, position):
    # the queries' and keys' heads go through one rotation side by side: each as rotary-embedding-torch
    # rotates it alone, at the absolute positions of the piece (angles in float32, as the library's)
    torch.manual_seed(0)
    attention = LocalAttention(dim=16, heads=2, dim_head=8, segment_len=6)
    x = torch.randn(2, 5, 16)
    q, k, v, normed = attention.project(x, position)
    heads = torch.nn.functional.linear(attention.norm(x), attention.to_qkv.weight).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    angles = attention.rotary(torch.arange(position, position + 5, dtype=torch.float32))
    for rotated, unrotated in ((q, heads[0]), (k, heads[1])):
        torch.testing.assert_close(rotated, apply_rotary_emb(angles, unrotated), atol=1e-12, rtol=0)
    torch.testing.assert_close(v, heads[2], atol=0, rtol=0)
    assert not torch.equal(q, heads[0])  # (the rotation did something)


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("pieces", [(23,), (5, 1, 10, 7), (1,) * 23])
def test_local_attention_equals_masked_dense_attention(float64, sliding, pieces):
    window = 6
    attention, x, expected = window_problem(sliding, window)

    outputs, cache, position = [], None, 0
    for length in pieces:  # streaming in pieces with the cache gives the same result
        out, cache = attention(x[:, position : position + length], position, cache)
        outputs.append(out)
        position += length
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-12, rtol=0)
    assert cache.keys.shape[2] <= window - 1


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("prompt_len", [1, 6, 8])  # inside, at the end of, past the first segment
def test_static_cache_steps_equal_masked_dense_attention(float64, sliding, prompt_len):
    # one token at a time on fixed-size buffers (CUDA-graph decoding), after a prompt on the growing cache
    window = 6
    attention, x, expected = window_problem(sliding, window)

    out, cache = attention(x[:, :prompt_len], 0)
    cache = attention.static_cache(cache, prompt_len)
    buffers = cache.keys
    outputs = [out]
    for position in range(prompt_len, 23):
        out, cache = attention(x[:, position : position + 1], position, cache)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-12, rtol=0)
    assert cache.keys is buffers and buffers.shape == (2, 2, window, 8)  # written in place, one slot a position


@pytest.mark.parametrize("sliding", [False, True])
def test_static_cache_with_two_keys_per_position_and_a_prefix(float64, sliding):
    # MAC's layout: each position adds its retrieved memory token's key and its own, after a prefix
    torch.manual_seed(0)
    window, n = 4, 13
    attention = LocalAttention(16, 2, 8, window, num_persist_mem_tokens=2, sliding=sliding, keys_per_position=2)
    q, k, v = torch.randn(2, 2, n, 8), torch.randn(2, 2, 2 * n, 8), torch.randn(2, 2, 2 * n, 8)

    def step(t, cache):
        prefix = attention.prefix_keys_values(None, t, 2)
        return attention.attend(q[:, :, t : t + 1], k[:, :, 2 * t : 2 * t + 2], v[:, :, 2 * t : 2 * t + 2], t, cache, prefix)

    growing = attention.empty_cache(2, "cpu", torch.float64)
    expected = []
    for t in range(n):
        out, growing = step(t, growing)
        expected.append(out)
        if t == 2:
            static = attention.static_cache(growing, 3)
    outputs = []
    for t in range(3, n):
        out, static = step(t, static)
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs, dim=2), torch.cat(expected[3:], dim=2), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="keys per position"):
        attention.attend(q[:, :, :1], k[:, :, :1], v[:, :, :1], 0, static)
    # a longer piece on a static cache continues as on the growing one
    t, end = n, n + 2  # inside the segment 12..15
    q2, k2, v2 = torch.randn(2, 2, end - t, 8), torch.randn(2, 2, 2 * (end - t), 8), torch.randn(2, 2, 2 * (end - t), 8)
    prefix = attention.prefix_keys_values(None, t, 2)
    out, cache = attention.attend(q2, k2, v2, t, static, prefix)
    expected_out, expected_cache = attention.attend(q2, k2, v2, t, growing, prefix)
    torch.testing.assert_close(out, expected_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(cache.keys, expected_cache.keys, atol=0, rtol=0)


@pytest.mark.parametrize("position", [0, 3, 8])
@pytest.mark.parametrize("offset, length", [(None, 10), (8, 10), (7, 1)])  # an offset moves one-token steps
def test_persistent_prefixes_of_all_pieces_at_once_equal_one_per_piece(float64, position, offset, length):
    from titans_pytorch.attention import segment_pieces

    torch.manual_seed(0)
    attention = LocalAttention(16, 2, 8, segment_len=4, num_persist_mem_tokens=3)
    attention.position_offset = None if offset is None else torch.tensor(offset)
    pieces = list(segment_pieces(position, length, 4))
    together = attention.persistent_prefixes(position, pieces, batch=2)
    if offset is not None:  # one per piece, at the positions the offset moves them to
        attention.position_offset, position = None, position + offset
    apart = [attention.prefix_keys_values(None, position + start, 2) for start, _ in pieces]
    assert len(together) == len(apart) == len(pieces) > (length > 1)
    for (keys, values), (expected_keys, expected_values) in zip(together, apart):
        assert keys.shape == expected_keys.shape == (2, 2, 3, 8)
        torch.testing.assert_close(keys, expected_keys, atol=1e-12, rtol=0)
        torch.testing.assert_close(values, expected_values, atol=1e-12, rtol=0)
    if length > 1:
        assert not torch.allclose(together[0][0], together[1][0])  # rotated at different segment starts
