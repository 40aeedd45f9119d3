"""MemoryAsContextTransformer: what only MAC does (long-term tokens, segment-level memory).
The checks shared by every variant are in test_transformer.py."""

import importlib.util
from pathlib import Path

import pytest
import torch

from titans_pytorch import MemoryAsContextTransformer


def small_mac(**kwargs):
    config = dict(
        num_tokens=32, dim=16, depth=2, segment_len=4, num_persist_mem_tokens=2, num_longterm_mem_tokens=2,
        heads=2, dim_head=8, num_residual_streams=2, neural_memory_kwargs=dict(chunk_size=2, heads=2, dim_head=8),
    )
    config.update(kwargs)
    torch.manual_seed(0)
    return MemoryAsContextTransformer(**config)


def influence_on_later_segment(model, segment_len=4):
    """Max change of segment s+2's logits when a token of segment s changes."""
    ids = torch.randint(0, 32, (2, 4 * segment_len))
    changed = ids.clone()
    changed[:, segment_len + 1] = (changed[:, segment_len + 1] + 5) % 32  # a token of segment 1
    later = slice(3 * segment_len, 4 * segment_len)  # segment 3
    return (model(changed)[:, later] - model(ids)[:, later]).abs().max().item()


def test_longterm_memory_carries_information_across_segments(float64):
    # block attention sees one segment: only the memory can carry a token two segments on
    assert influence_on_later_segment(small_mac()) > 1e-6
    assert influence_on_later_segment(small_mac(neural_memory_layers=())) == 0.0


def switched_off(model, **reads):
    """benchmarks/recall_paths.py's switch: zero the named memory reads of every layer
    (per_token, longterm, gate) inside the block; the memory still stores."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recall_paths.py"
    spec = importlib.util.spec_from_file_location("recall_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.switched_off(model, **reads)


def test_each_retrieval_path_alone_carries_information(float64):
    # per-token retrieval h_t = M_{s-1}(q_t), without long-term tokens or the gating read
    model = small_mac(num_longterm_mem_tokens=0)
    with switched_off(model, gate=True):
        assert influence_on_later_segment(model) > 1e-6
    # the long-term tokens alone
    model = small_mac()
    with switched_off(model, per_token=True, gate=True):
        assert influence_on_later_segment(model) > 1e-6
    # nothing left: exactly no influence (so the switch does what it says)
    model = small_mac(num_longterm_mem_tokens=0)
    with switched_off(model, per_token=True, gate=True):
        assert influence_on_later_segment(model) == 0.0


def test_retrieved_token_is_seen_from_its_own_position_on(float64):
    # h_t depends on x_t: were it visible to earlier tokens, changing x_t would change their
    # logits; checked at every offset inside a segment (segment_len 4, tokens 4..7)
    model = small_mac(num_persist_mem_tokens=0, num_longterm_mem_tokens=0)
    ids = torch.randint(0, 32, (2, 8))
    logits = model(ids)
    for t in range(4, 8):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 3) % 32
        assert torch.equal(model(changed)[:, :t], logits[:, :t])


def test_memory_stores_the_stream_after_attention(float64):
    # the paper's order: retrieve, attend, then store the attention layer's output. In the
    # residual stream that is x + Attn(...): capture, per layer, the mixer's input x, the
    # attention branch (to_out_proj's output) and what the memory is given to store
    model = small_mac(num_residual_streams=1)
    seen = {}
    for index, layer in enumerate(model.layers):
        mixer = layer[1]
        mixer.register_forward_pre_hook(lambda m, args, i=index: seen.setdefault(("x", i), []).append(args[0]))
        mixer.attention.to_out_proj.register_forward_hook(
            lambda m, args, out, i=index: seen.setdefault(("attn", i), []).append(out)
        )
        mixer.memory.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: seen.setdefault(("stored", i), []).append((args[0], kwargs["addresses"].keys)),
            with_kwargs=True,
        )
    model(torch.randint(0, 32, (2, 10)))  # 3 segment pieces of 4, 4, 2 tokens
    for index in range(len(model.layers)):
        x = seen[("x", index)][0]
        attn = torch.cat(seen[("attn", index)], dim=1)
        stored = torch.cat([values for values, _ in seen[("stored", index)]], dim=1)
        keys = torch.cat([keys for _, keys in seen[("stored", index)]], dim=2)
        assert attn.abs().max() > 1e-3  # the attention branch is not trivially zero
        torch.testing.assert_close(stored, x + attn, atol=1e-12, rtol=0)
        # addressed by the tokens: the keys the memory is given are those of x (computed once, before the pieces)
        memory = model.layers[index][1].memory
        torch.testing.assert_close(keys, memory.addresses(x).keys, atol=0, rtol=0)
        from_stored, _, _, _ = memory._keys_values_gates(memory.norm(x + attn), memory.init_state(2, dtype=x.dtype))
        assert not torch.allclose(keys, from_stored)


def test_gated_read_is_the_attention_gating_the_memory_read(float64):
    # out = sigmoid(RMSNorm(Attn)) * RMSNorm(M(x)): capture the attention branch, the memory's
    # read and the mixer's output of every segment piece
    model = small_mac(num_residual_streams=1)
    seen = {}
    for index, layer in enumerate(model.layers):
        mixer = layer[1]
        mixer.register_forward_hook(lambda m, args, out, i=index: seen.setdefault(("out", i), []).append(out[0]))
        mixer.attention.to_out_proj.register_forward_hook(
            lambda m, args, out, i=index: seen.setdefault(("attn", i), []).append(out)
        )
        mixer.memory.register_forward_hook(lambda m, args, out, i=index: seen.setdefault(("read", i), []).append(out[0]))
    model(torch.randint(0, 32, (2, 10)))
    for index, layer in enumerate(model.layers):
        gate = layer[1].gate
        attn, read = (torch.cat(seen[(kind, index)], dim=1) for kind in ("attn", "read"))
        expected = torch.sigmoid(gate.attention_norm(attn)) * gate.memory_norm(read)
        torch.testing.assert_close(seen[("out", index)][0], expected, atol=1e-12, rtol=0)


def test_seed_readme_block_runs():
    transformer = MemoryAsContextTransformer(
        num_tokens=256, dim=64, depth=2, segment_len=32, num_persist_mem_tokens=4, num_longterm_mem_tokens=16,
    )
    token_ids = torch.randint(0, 256, (1, 127))
    loss = transformer(token_ids, return_loss=True)
    loss.backward()
    sampled = transformer.sample(token_ids[:, :4], 40)
    assert sampled.shape == (1, 36) and sampled.min() >= 0 and sampled.max() < 256


def test_bad_mac_arguments_raise():
    with pytest.raises(ValueError, match="multiple of"):
        small_mac(segment_len=5)
    with pytest.raises(ValueError, match="num_longterm_mem_tokens"):
        small_mac(num_longterm_mem_tokens=-1)
