"""MemoryAsContextTransformer: causality, cached decoding, memory carrying information, errors."""

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


@pytest.mark.parametrize("sliding", [False, True])
def test_causal(float64, sliding):
    model = small_mac(sliding_window_attn=sliding)
    ids = torch.randint(0, 32, (2, 13))
    logits = model(ids)
    for t in (0, 3, 4, 9, 12):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 32
        other = model(changed)
        assert torch.equal(other[:, :t], logits[:, :t]), f"token {t} changed earlier logits"
        assert not torch.allclose(other[:, t], logits[:, t])


@pytest.mark.parametrize("sliding", [False, True])
@pytest.mark.parametrize("prompt_len", [1, 3, 6, 9])
def test_cached_decoding_equals_uncached(float64, sliding, prompt_len):
    model = small_mac(sliding_window_attn=sliding).eval()
    ids = torch.randint(0, 32, (2, 15))
    full = model(ids)
    logits, cache = model(ids[:, :prompt_len], return_cache=True)
    steps = [logits]
    for t in range(prompt_len, 15):
        logits, cache = model(ids[:, t : t + 1], cache=cache, return_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)
    assert cache.position == 15


@pytest.mark.parametrize("prompt_len", [2, 7])
def test_greedy_sampling_cached_equals_uncached(float64, prompt_len):
    model = small_mac()
    prompt = torch.randint(0, 32, (2, prompt_len))
    cached = model.sample(prompt, 14, temperature=0.0, use_cache=True)
    uncached = model.sample(prompt, 14, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 14 - prompt_len)
    assert torch.equal(cached, uncached)


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


def without_gate_read(model):
    """Keep each memory's store but make its gating read a constant, so that the
    long-term tokens are the memory's only way into the output."""
    for layer in model.layers:
        memory = layer[1].memory
        if memory is None:
            continue

        def store_only(y, state=None, return_state=False, original=memory.forward):
            _, state = original(y, state=state, return_state=True)
            return torch.zeros_like(y), state

        memory.forward = store_only
    return model


def test_longterm_tokens_alone_carry_information(float64):
    assert influence_on_later_segment(without_gate_read(small_mac())) > 1e-6
    assert influence_on_later_segment(without_gate_read(small_mac(num_longterm_mem_tokens=0))) == 0.0


def test_loss_reaches_every_parameter():
    model = small_mac()
    ids = torch.randint(0, 32, (2, 12))
    # one step first: hyper-connections start with zero dynamic weights, whose scales then get
    # an exactly zero (but present) gradient
    model(ids, return_loss=True).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(ids, return_loss=True).backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} received no gradient"
            assert param.grad.abs().sum() > 0, f"{name} received a zero gradient"


def test_seed_readme_block_runs():
    transformer = MemoryAsContextTransformer(
        num_tokens=256, dim=64, depth=2, segment_len=32, num_persist_mem_tokens=4, num_longterm_mem_tokens=16,
    )
    token_ids = torch.randint(0, 256, (1, 127))
    loss = transformer(token_ids, return_loss=True)
    loss.backward()
    sampled = transformer.sample(token_ids[:, :4], 40)
    assert sampled.shape == (1, 36) and sampled.min() >= 0 and sampled.max() < 256


def test_sampling_filters():
    model = small_mac()
    prompt = torch.randint(0, 32, (1, 3))
    for name, kwargs in (("min_p", {}), ("top_k", {"k": 3}), ("top_p", {"thres": 0.8})):
        assert model.sample(prompt, 8, filter_fn=name, filter_kwargs=kwargs).shape == (1, 5)
    # top_k with k = 1 is greedy whatever the temperature
    torch.testing.assert_close(
        model.sample(prompt, 8, filter_fn="top_k", filter_kwargs={"k": 1}), model.sample(prompt, 8, temperature=0.0)
    )


def test_bad_inputs_raise():
    model = small_mac()
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model(torch.tensor([[1, 2, 40]]))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(1, 5))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="prompt length"):
        model.sample(torch.randint(0, 32, (1, 10)), 5)
    with pytest.raises(ValueError, match="at least one token"):
        model.sample(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="filter_fn"):
        model.sample(torch.randint(0, 32, (1, 2)), 5, filter_fn="nucleus")
    with pytest.raises(ValueError, match="multiple of"):
        small_mac(segment_len=5)
    with pytest.raises(ValueError, match="neural_memory_layers"):
        small_mac(neural_memory_layers=(0, 3))
    with pytest.raises(ValueError, match="segment_len"):
        small_mac(segment_len=0)
