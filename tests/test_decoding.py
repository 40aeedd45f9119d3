"""CUDA-graph decoding (`titans_pytorch.decoding`): one captured step per offset in the decoding
period replays every later step at that offset. On a CPU the graphs are stood in for by
`rerun_eagerly`, which replays a step with the host work of its capture (the captured position
included) into the capture's output buffers, as a graph does; the CUDA test captures real graphs."""

import pytest
import torch

from test_transformer import BUILDERS, MEMORY, NUM_TOKENS, SEGMENT, build
from titans_pytorch import MemoryAsContextTransformer
from titans_pytorch.cuda_graphs import rerun_eagerly
from titans_pytorch.decoding import MAX_GRAPHED_PERIOD, GraphDecoder, decoding_period, decoding_warmup, rotary_offset


def decode(model, ids, prompt_len, decoder):
    """Logits of `ids` from a prompt of `prompt_len` tokens, then one token at a time through `decoder`."""
    logits, cache = model(ids[:, :prompt_len], return_cache=True)
    steps = [logits]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = decoder(ids[:, t : t + 1], cache)
        steps.append(logits.clone())
    return torch.cat(steps, dim=1), cache


CASES = {**BUILDERS, "mac-refresh": lambda **kw: BUILDERS["mac"](neural_memory_kwargs={**MEMORY, "refresh_every": 2}, **kw)}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("prompt_len", [1, SEGMENT, 6])  # the first graph inside, at the start of, a segment
def test_replayed_steps_equal_eager_decoding(float64, name, prompt_len):
    # equal to eager cached decoding, which equals the uncached forward (tests/test_transformer.py) except
    # with refresh_every > 1, where a call ending inside a span starts a new span with the next
    torch.manual_seed(0)
    model = CASES[name]().eval()
    decoder = GraphDecoder(model, capture=rerun_eagerly)
    length = prompt_len + decoder.warmup + 4 * decoder.period + 3
    ids = torch.randint(0, NUM_TOKENS, (2, length))
    with torch.no_grad():
        eager, _ = decode(model, ids, prompt_len, lambda t, c: model(t, cache=c, return_cache=True))
        logits, cache = decode(model, ids, prompt_len, decoder)
        if name in BUILDERS:
            torch.testing.assert_close(eager, model(ids), atol=1e-10, rtol=0)
    torch.testing.assert_close(logits, eager, atol=1e-10, rtol=0)
    assert cache.position == length
    # one capture per offset in the period (and per warm-up shape): the later steps are replays
    steps = length - max(prompt_len, decoder.warmup)
    assert decoder.captures == decoder.period < steps


def test_the_rotary_offset_is_what_moves_a_step(float64):
    # a step replayed a period later without shifting its rotary positions would attend as if still at
    # the captured position: its logits differ, so the equality above depends on the offset
    model = build("mac").eval()
    decoder = GraphDecoder(model, capture=rerun_eagerly)
    ids = torch.randint(0, NUM_TOKENS, (2, 3 + 3 * decoder.period))
    with torch.no_grad():
        full = model(ids)
        decoder.offset = torch.zeros((), dtype=torch.long)
        decoder.offset.fill_ = lambda value: decoder.offset  # never moved from the captured position
        logits, _ = decode(model, ids, 3, decoder)
    late = 3 + decoder.period
    torch.testing.assert_close(logits[:, :late], full[:, :late], atol=1e-10, rtol=0)
    assert not torch.allclose(logits[:, late:], full[:, late:], atol=1e-6)


@pytest.mark.parametrize("name", [name for name in BUILDERS if name != "lmm"])
def test_rotary_offset_reaches_every_rotated_position(float64, name):
    # attention depends on rotary positions only through their differences: shifting all of them
    # (queries, keys, persistent and long-term tokens, retrieved memory tokens) by the offset leaves the
    # logits as they were (up to the rotary angles' float32 rounding), and missing any one of them would not
    model = build(name).eval()
    ids = torch.randint(0, NUM_TOKENS, (2, 3 * SEGMENT + 1))
    with torch.no_grad():
        expected = model(ids)
        with rotary_offset(model, torch.tensor(100)):
            shifted = model(ids)
        torch.testing.assert_close(shifted, expected, atol=1e-6, rtol=0)
        assert all(m.position_offset is None for m in model.modules() if hasattr(m, "position_offset"))
        # the keys of persistent, long-term and retrieved tokens left unshifted: the logits move
        attention = next(m for m in model.modules() if hasattr(m, "position_offset"))
        keys_values = attention.keys_values

        def unshifted(*args):
            offset, attention.position_offset = attention.position_offset, None
            try:
                return keys_values(*args)
            finally:
                attention.position_offset = offset

        attention.keys_values = unshifted
        with rotary_offset(model, torch.tensor(100)):
            assert (model(ids) - expected).abs().max() > 1e-3


def test_period_and_warmup():
    model = MemoryAsContextTransformer(num_tokens=8, dim=16, depth=2, segment_len=8, heads=2, dim_head=8,
                                       neural_memory_kwargs=dict(chunk_size=4, heads=2, dim_head=8))
    assert (decoding_period(model), decoding_warmup(model)) == (8, 0)
    sliding = MemoryAsContextTransformer(num_tokens=8, dim=16, depth=2, segment_len=8, heads=2, dim_head=8,
                                         sliding_window_attn=True,
                                         neural_memory_kwargs=dict(chunk_size=4, heads=2, dim_head=8, refresh_every=4))
    assert (decoding_period(sliding), decoding_warmup(sliding)) == (16, 8)


@pytest.mark.parametrize("name", ["mac", "mag"])
def test_generate_replays_graphs_when_given_a_decoder(float64, name, monkeypatch):
    model = build(name)
    prompt = torch.randint(0, NUM_TOKENS, (2, 3))
    expected = model.sample(prompt, 40, temperature=0.0, use_cache=False)
    decoders = []

    def graph_decoder(prompt, num_new_tokens):
        decoders.append(GraphDecoder(model, capture=rerun_eagerly))
        return decoders[-1]

    monkeypatch.setattr(model, "_graph_decoder", graph_decoder)
    assert torch.equal(model.sample(prompt, 40, temperature=0.0), expected)
    assert 0 < decoders[0].captures < 37
    decoders.clear()
    assert torch.equal(model.sample(prompt, 40, temperature=0.0, cuda_graphs=False), expected)
    assert not decoders


def test_short_generations_and_cpus_run_eagerly():
    model = build("mac")
    prompt = torch.randint(0, NUM_TOKENS, (1, 3))
    assert model._graph_decoder(prompt, 1000) is None  # not on CUDA


@pytest.mark.cuda
def test_long_periods_decode_eagerly():
    long = build("mac", segment_len=2 * MAX_GRAPHED_PERIOD).cuda()
    prompt = torch.randint(0, NUM_TOKENS, (1, 3), device="cuda")
    assert long._graph_decoder(prompt, 10 * MAX_GRAPHED_PERIOD) is None
    assert build("mac").cuda()._graph_decoder(prompt, 10 * MAX_GRAPHED_PERIOD) is not None


@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("name", CASES)
def test_cuda_graph_decoding_equals_eager_decoding(name, autocast):
    torch.manual_seed(0)
    model = CASES[name]().cuda().eval()
    decoder = GraphDecoder(model)
    length = 5 + decoder.warmup + 4 * decoder.period
    ids = torch.randint(0, NUM_TOKENS, (2, length), device="cuda")
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        eager, _ = decode(model, ids, 5, lambda t, c: model(t, cache=c, return_cache=True))
        logits, _ = decode(model, ids, 5, decoder)
    torch.testing.assert_close(logits.float(), eager.float(), **tolerance)
    assert decoder.captures == decoder.period
    assert model._graph_decoder(ids[:, :5], 2 * decoder.period + decoder.warmup + 1) is not None
    assert model._graph_decoder(ids[:, :5], 2) is None
    if not autocast:
        prompt, new = ids[:, :3], 3 * decoder.period + decoder.warmup
        assert torch.equal(model.sample(prompt, 3 + new, temperature=0.0),
                           model.sample(prompt, 3 + new, temperature=0.0, cuda_graphs=False))
