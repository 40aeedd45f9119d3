"""CUDA-graph decoding (`titans_pytorch.decoding`): one captured step per kind of step (offset in the
memories' period, a segment's start or not) replays every later step of that kind, on attention
caches of fixed size written in place. On a CPU the graphs are stood in for by
`rerun_eagerly`, which replays a step with the host work of its capture (the captured position
included) into the capture's output buffers, as a graph does; the CUDA test captures real graphs."""

import pytest
import torch

from test_transformer import BUILDERS, MEMORY, NUM_TOKENS, SEGMENT, build
from titans_pytorch import MemoryAsContextTransformer
from titans_pytorch.cuda_graphs import rerun_eagerly
from titans_pytorch.attention import LocalAttention, StaticAttentionCache
from titans_pytorch.decoding import MAX_GRAPHED_PERIOD, GraphDecoder, decoding_period, rotary_offset


def decode(model, ids, prompt_len, decoder, on_step=None):
    """Logits of `ids` from a prompt of `prompt_len` tokens, then one token at a time through `decoder`."""
    logits, cache = model(ids[:, :prompt_len], return_cache=True)
    steps = [logits]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = decoder(ids[:, t : t + 1], cache)
        steps.append(logits.clone())
        if on_step is not None:
            on_step(cache)
    return torch.cat(steps, dim=1), cache


LONG_SEGMENT = 4 * SEGMENT  # segments and windows of 16, chunks of 2: 3 kinds of step, not 16 offsets
CASES = {
    **BUILDERS,
    "mac-refresh": lambda **kw: BUILDERS["mac"](neural_memory_kwargs={**MEMORY, "refresh_every": 2}, **kw),
    "mac-long-segment": lambda **kw: BUILDERS["mac"](segment_len=LONG_SEGMENT, **kw),
    "mag-long-window": lambda **kw: BUILDERS["mag"](segment_len=LONG_SEGMENT, **kw),
    # a layer without a memory beside one with (the former's prefix: persistent tokens alone)
    "mac-mixed-layers": lambda **kw: BUILDERS["mac"](neural_memory_layers=(2,), **kw),
    "mal-refresh-3": lambda **kw: BUILDERS["mal"](neural_memory_kwargs={**MEMORY, "refresh_every": 3}, **kw),
}


def decoding_length(model, prompt_len):
    """Past the prompt, three segments or windows (or memory chunks, if longer) and a bit."""
    return prompt_len + 3 * max(GraphDecoder(model).period, getattr(model, "segment_len", 1)) + 3


def attention_buffers(cache):
    return [layer.attention for layer in cache.layers if layer.attention is not None]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("prompt_len", [1, SEGMENT, 6])  # the first graph inside, at the start of, a segment
def test_replayed_steps_equal_eager_decoding(float64, name, prompt_len):
    # equal to eager cached decoding, which equals the uncached forward (tests/test_transformer.py) except
    # with refresh_every > 1, where a call ending inside a span starts a new span with the next
    torch.manual_seed(0)
    model = CASES[name]().eval()
    decoder = GraphDecoder(model, capture=rerun_eagerly)
    length = decoding_length(model, prompt_len)
    ids = torch.randint(0, NUM_TOKENS, (2, length))
    buffers = []
    with torch.no_grad():
        eager, _ = decode(model, ids, prompt_len, lambda t, c: model(t, cache=c, return_cache=True))
        logits, cache = decode(model, ids, prompt_len, decoder, lambda c: buffers.append(attention_buffers(c)))
        if name in BUILDERS:
            torch.testing.assert_close(eager, model(ids), atol=1e-10, rtol=0)
    torch.testing.assert_close(logits, eager, atol=1e-10, rtol=0)
    assert cache.position == length
    # one capture per kind of step: the later steps are replays
    kinds = {decoder.step_kind(position) for position in range(prompt_len, length)}
    assert decoder.captures == len(kinds) <= decoder.period + 1 < length - prompt_len
    # the attention caches are fixed-size buffers, the same tensors from step to step, written in place
    for step in buffers:
        assert len(step) == len(buffers[0])
        assert all(c.keys is first.keys and c.values is first.values for c, first in zip(step, buffers[0]))
    for attention, (_, mixer, _, _) in zip(attention_buffers(cache), model.layers):
        assert isinstance(attention, StaticAttentionCache)
        assert attention.keys.shape[2] == mixer.attention.segment_len * mixer.attention.keys_per_position


@pytest.mark.parametrize("name, distinct", [("mac", 1), ("mac-mixed-layers", 2), ("mag", 1), ("mal", 1)])
def test_a_step_builds_each_distinct_mask_once(float64, name, distinct, monkeypatch):
    # the layers of one forward attend at the same positions: a step builds each distinct mask (here: per
    # keys per position) once, eagerly and in a graph, not once per layer; the outputs are checked above
    built = []
    for method in ("_mask", "_static_slots_and_mask"):
        original = getattr(LocalAttention, method)
        monkeypatch.setattr(LocalAttention, method, lambda self, *args, original=original: built.append(self) or original(self, *args))
    torch.manual_seed(0)
    model = CASES[name]().eval()
    assert len(model.layers) == 2
    ids = torch.randint(0, NUM_TOKENS, (2, 3 * SEGMENT))
    with torch.no_grad():
        _, cache = model(ids[:, :SEGMENT + 1], return_cache=True)
        decoder = GraphDecoder(model, capture=rerun_eagerly)
        for step in (lambda t, c: model(t, cache=c, return_cache=True), decoder):
            steps = cache
            for t in range(SEGMENT + 1, ids.shape[1]):
                built.clear()
                captures = decoder.captures
                _, steps = step(ids[:, t : t + 1], steps)
                assert len(built) == distinct * (1 + decoder.captures - captures)  # (the stand-in runs a capture too)


def test_the_rotary_offset_is_what_moves_a_step(float64):
    # a step replayed a period later without shifting its positions would attend as if still at the
    # captured position (rotary angles, the slot it writes, the slots it sees): its logits differ, so the
    # equality above depends on the offset
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
        keys_values, persistent_prefixes = attention.keys_values, attention.persistent_prefixes

        def keys_values_unshifted(tokens, positions):
            return keys_values(tokens, positions - attention.position_offset)

        def persistent_prefixes_unshifted(*args):
            offset, attention.position_offset = attention.position_offset, None
            try:
                return persistent_prefixes(*args)
            finally:
                attention.position_offset = offset

        attention.keys_values, attention.persistent_prefixes = keys_values_unshifted, persistent_prefixes_unshifted
        with rotary_offset(model, torch.tensor(100)):
            assert (model(ids) - expected).abs().max() > 1e-3


def test_period_and_step_kinds():
    model = MemoryAsContextTransformer(num_tokens=8, dim=16, depth=2, segment_len=8, heads=2, dim_head=8,
                                       neural_memory_kwargs=dict(chunk_size=4, heads=2, dim_head=8))
    decoder = GraphDecoder(model)
    assert decoding_period(model) == decoder.period == 4
    assert [decoder.step_kind(p) for p in (0, 4, 5, 8, 17)] == [(0, (True,)), (0, (False,)), (1, (False,)),
                                                                 (0, (True,)), (1, (False,))]
    sliding = MemoryAsContextTransformer(num_tokens=8, dim=16, depth=2, segment_len=8, heads=2, dim_head=8,
                                         sliding_window_attn=True,
                                         neural_memory_kwargs=dict(chunk_size=4, heads=2, dim_head=8, refresh_every=4))
    # refresh_every plays no part (a one-token step completes one chunk at most); a sliding MAC's segment
    # starts count (its prefix and long-term reads), MAG's window does not
    assert GraphDecoder(sliding).period == 4 and GraphDecoder(sliding).step_kind(8) == (0, (True,))
    assert GraphDecoder(build("mag")).step_kind(SEGMENT) == (0, ())
    assert decoding_period(build("mac", neural_memory_layers=())) == 1  # no memory


@pytest.mark.parametrize("name", ["mac", "mac-sliding", "mag"])
def test_graph_and_eager_caches_take_turns(float64, name):
    # the decoder's cache continued eagerly by a longer piece, that eager cache back into the decoder, and
    # the same decoder reused for another prompt: all as the uncached forward
    model = CASES[name]().eval()
    decoder = GraphDecoder(model, capture=rerun_eagerly)
    ids = torch.randint(0, NUM_TOKENS, (2, 31))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model(ids[:, :3], return_cache=True)
        steps = [logits]
        for start, end, graphed in ((3, 12, True), (12, 19, False), (19, 31, True)):
            for t in range(start, end) if graphed else [start]:
                step = ids[:, t : t + 1] if graphed else ids[:, start:end]
                logits, cache = decoder(step, cache) if graphed else model(step, cache=cache, return_cache=True)
                steps.append(logits.clone())
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)
        other = torch.randint(0, NUM_TOKENS, (2, 20))
        logits, _ = decode(model, other, 5, decoder)
    torch.testing.assert_close(logits, model(other), atol=1e-10, rtol=0)


def test_one_token_at_a_time():
    model = build("mac").eval()
    ids = torch.randint(0, NUM_TOKENS, (1, 5))
    _, cache = model(ids[:, :3], return_cache=True)
    with pytest.raises(ValueError, match=r"one new token per sequence \(batch, 1\), got \(1, 2\)"):
        GraphDecoder(model, capture=rerun_eagerly)(ids[:, 3:], cache)


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
def test_long_memory_chunks_decode_eagerly():
    chunk = 2 * MAX_GRAPHED_PERIOD
    long = build("mac", segment_len=chunk, neural_memory_kwargs={**MEMORY, "chunk_size": chunk}).cuda()
    prompt = torch.randint(0, NUM_TOKENS, (1, 3), device="cuda")
    assert long._graph_decoder(prompt, 10 * MAX_GRAPHED_PERIOD) is None
    # a long segment is no reason not to: its steps share the graphs of the memory's chunk offsets
    long_segment = build("mac", segment_len=4 * MAX_GRAPHED_PERIOD).cuda()
    assert long_segment._graph_decoder(prompt, 10 * MAX_GRAPHED_PERIOD) is not None


# every case in float32; under bf16 autocast (train_mac.py's samples) one per kind of mixer, to keep the
# device check short
CUDA_CASES = [(name, False) for name in CASES] + [(name, True) for name in ("mac", "mac-sliding", "mag", "lmm")]


@pytest.mark.cuda
@pytest.mark.parametrize("name, autocast", CUDA_CASES,
                         ids=[f"{name}-{'bf16-autocast' if autocast else 'float32'}" for name, autocast in CUDA_CASES])
def test_cuda_graph_decoding_equals_eager_decoding(name, autocast):
    torch.manual_seed(0)
    model = CASES[name]().cuda().eval()
    decoder = GraphDecoder(model)
    length = decoding_length(model, 5)
    ids = torch.randint(0, NUM_TOKENS, (2, length), device="cuda")
    tolerance = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-4, rtol=1e-4)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        eager, _ = decode(model, ids, 5, lambda t, c: model(t, cache=c, return_cache=True))
        logits, _ = decode(model, ids, 5, decoder)
    torch.testing.assert_close(logits.float(), eager.float(), **tolerance)
    assert decoder.captures == len({decoder.step_kind(position) for position in range(5, length)})
    assert model._graph_decoder(ids[:, :5], 2 * decoder.period + 1) is not None
    assert model._graph_decoder(ids[:, :5], 2 * decoder.period) is None
    if not autocast:
        prompt = ids[:, :3]
        assert torch.equal(model.sample(prompt, length, temperature=0.0),
                           model.sample(prompt, length, temperature=0.0, cuda_graphs=False))
