"""What every Titans language model (MAC, MAG, MAL, LMM) must do: causality, cached decoding
equal to the uncached forward, flat decoding cost, gradients everywhere, errors."""

import gc

import pytest
import torch

from dispatch import Created, ElementsWritten, HostReads
from titans_pytorch import MemoryAsContextTransformer, MemoryAsGateTransformer, MemoryAsLayerTransformer, MemoryTransformer
from hyper_connections.hyper_connections import HyperConnections
from titans_pytorch.cuda_graphs import tensor_leaves
from titans_pytorch.streams import FusedHyperConnections

NUM_TOKENS, SEGMENT = 32, 4
MEMORY = dict(chunk_size=2, heads=2, dim_head=8)
COMMON = dict(num_tokens=NUM_TOKENS, dim=16, depth=2, num_residual_streams=2, neural_memory_kwargs=MEMORY)
ATTENTION = dict(segment_len=SEGMENT, num_persist_mem_tokens=2, heads=2, dim_head=8)

BUILDERS = {
    "mac": lambda **kw: MemoryAsContextTransformer(**{**COMMON, **ATTENTION, "num_longterm_mem_tokens": 2, **kw}),
    "mac-sliding": lambda **kw: MemoryAsContextTransformer(
        **{**COMMON, **ATTENTION, "num_longterm_mem_tokens": 2, "sliding_window_attn": True, **kw}
    ),
    "mac-no-prefix": lambda **kw: MemoryAsContextTransformer(  # no persistent, no long-term tokens
        **{**COMMON, **ATTENTION, "num_persist_mem_tokens": 0, **kw}
    ),
    "mag": lambda **kw: MemoryAsGateTransformer(**{**COMMON, **ATTENTION, **kw}),
    "mal": lambda **kw: MemoryAsLayerTransformer(**{**COMMON, **ATTENTION, **kw}),
    "lmm": lambda **kw: MemoryTransformer(**{**COMMON, **kw}),
}
WITH_ATTENTION = [name for name in BUILDERS if name != "lmm"]


def build(name, **kwargs):
    torch.manual_seed(0)
    return BUILDERS[name](**kwargs)


@pytest.mark.parametrize("name", BUILDERS)
def test_streams_laid_out_by_position_equal_the_librarys_layout(float64, name):
    # the forward keeps every position in the batch dimension of the hyper-connections' streams; as
    # the library lays them out, (batch streams, length, dim), the model computes the same logits (and
    # with each layer's masks its own, as the layers of the model's forward share them)
    model = build(name)
    ids = torch.randint(0, NUM_TOKENS, (2, 3 * SEGMENT + 1))
    x = model.expand_streams(model.token_emb(ids))
    assert x.shape == (2 * 2, ids.shape[1], 16)
    for mix_connection, mixer, ff_connection, feed_forward in model.layers:
        branch_input, add_residual = mix_connection(x)
        x = add_residual(mixer(branch_input, 0, None, None)[0])
        branch_input, add_residual = ff_connection(x)
        x = add_residual(feed_forward(branch_input))
    expected = model.to_logits(model.norm(model.reduce_streams(x)))
    torch.testing.assert_close(model(ids), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", BUILDERS)
def test_every_hyper_connection_is_the_fused_one_with_the_librarys_keys(name):
    model = build(name)
    connections = [c for layer in model.layers for c in (layer[0], layer[2])]
    assert len(connections) == 2 * COMMON["depth"]
    assert all(type(c) is FusedHyperConnections for c in connections)
    # the library's parameters, under the library's keys: checkpoints keep their keys
    library = HyperConnections(2, dim=16, layer_index=0)
    assert set(connections[0].state_dict()) == set(library.state_dict())
    assert "layers.0.0.norm.gamma" in model.state_dict()
    one_stream = build(name, num_residual_streams=1)
    assert not any(isinstance(m, HyperConnections) for m in one_stream.modules())


@pytest.mark.parametrize("name", BUILDERS)
def test_causal(float64, name):
    model = build(name)
    ids = torch.randint(0, NUM_TOKENS, (2, 13))
    logits = model(ids)
    for t in (0, 3, 4, 9, 12):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % NUM_TOKENS
        other = model(changed)
        assert torch.equal(other[:, :t], logits[:, :t]), f"token {t} changed earlier logits"
        assert not torch.allclose(other[:, t], logits[:, t])


@pytest.mark.parametrize("name", BUILDERS)
@pytest.mark.parametrize("prompt_len", [1, 3, 6, 9])
def test_cached_decoding_equals_uncached(float64, name, prompt_len):
    model = build(name).eval()
    ids = torch.randint(0, NUM_TOKENS, (2, 15))
    full = model(ids)
    logits, cache = model(ids[:, :prompt_len], return_cache=True)
    steps = [logits]
    for t in range(prompt_len, 15):
        logits, cache = model(ids[:, t : t + 1], cache=cache, return_cache=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)
    assert cache.position == 15


@pytest.mark.parametrize("name", BUILDERS)
def test_greedy_sampling_cached_equals_uncached(float64, name):
    model = build(name)
    prompt = torch.randint(0, NUM_TOKENS, (2, 5))
    cached = model.sample(prompt, 16, temperature=0.0, use_cache=True)
    uncached = model.sample(prompt, 16, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 11)
    assert torch.equal(cached, uncached)


def cache_numel(cache):
    """Elements held by a TransformerCache: every tensor in every layer's cache."""
    return sum(t.numel() for t in tensor_leaves(cache.layers))


@pytest.mark.parametrize("name", BUILDERS)
def test_decoding_state_does_not_grow_with_context(name):
    # decoding cost is flat in context length: the cache a new token works on holds the
    # same number of elements after 8 tokens as after 64 (same offset in segment and chunk)
    model = build(name).eval()
    ids = torch.randint(0, NUM_TOKENS, (1, 64))
    sizes = {}
    with torch.no_grad():
        _, cache = model(ids[:, :1], return_cache=True)
        for t in range(1, 64):
            _, cache = model(ids[:, t : t + 1], cache=cache, return_cache=True)
            if t + 1 in (8, 64):
                sizes[t + 1] = cache_numel(cache)
    assert sizes[8] == sizes[64] > 0


@pytest.mark.parametrize("memory", ["memory", "attention alone"])
@pytest.mark.parametrize("name", WITH_ATTENTION)
def test_a_prompts_cache_holds_its_window_not_the_prompts_projections(name, memory):
    # the keys and values a prompt leaves in the cache are its last segment's or window's, copied out of
    # the projections of the whole call (its queries, keys and values), not views that keep those alive
    model = (build(name) if memory == "memory" else build(name, neural_memory_layers=())).eval()
    with torch.no_grad():
        _, cache = model(torch.randint(0, NUM_TOKENS, (1, 6 * SEGMENT + 3)), return_cache=True)
    for layer in cache.layers:
        for t in (layer.attention.keys, layer.attention.values):
            window_bytes = 2 * SEGMENT * t.shape[1] * 2 * t.shape[3] * t.element_size()  # two windows, two keys a position
            assert 0 < t.untyped_storage().nbytes() <= window_bytes


def elements_per_token(model, length):
    ids = torch.randint(0, NUM_TOKENS, (1, length + 1))
    model.zero_grad(set_to_none=True)
    with ElementsWritten() as counter:
        model(ids, return_loss=True).backward()
    return counter.elements / length


@pytest.mark.parametrize("name", BUILDERS)
def test_training_step_work_is_linear_in_length(name):
    # elements written per token, forward and backward: flat in the sequence length, so nothing
    # per segment touches the whole sequence (a slice per segment does, in its backward)
    model = build(name)
    short, long = elements_per_token(model, 16 * SEGMENT), elements_per_token(model, 64 * SEGMENT)
    assert long < 1.1 * short, f"{long:.0f} elements written per token at 4x the length, {short:.0f} before"


@pytest.mark.parametrize("name", BUILDERS)
def test_backward_frees_what_the_forward_kept(name):
    # a training loop's last loss is still alive while the next step runs: its graph must not hold
    # the forward's buffers (the memory's chunk states, activations, ...) after the backward
    model = build(name)
    ids = torch.randint(0, NUM_TOKENS, (2, 4 * SEGMENT + 1))
    with Created() as created:
        loss = model(ids, return_loss=True)
    loss.backward()
    gc.collect()
    alive = created.alive(loss)
    assert not alive, f"{len(alive)} tensors of the forward pass still alive: {[tuple(t.shape) for t in alive]}"


@pytest.mark.parametrize("name", BUILDERS)
def test_step_and_decoding_read_nothing_back_but_the_input_check(name, monkeypatch):
    # on a GPU a value read back to the host waits for the device and breaks CUDA-graph capture;
    # the only ones are the token ids' range check at the model's entry
    model = build(name)
    ids = torch.randint(0, NUM_TOKENS, (2, 2 * SEGMENT + 3))
    with HostReads() as checked:
        model(ids)
    assert checked.ops, "the input check reads the ids' range"
    monkeypatch.setattr(model, "_check_ids", lambda ids, name="ids": None)
    with HostReads() as training:
        model(ids, return_loss=True).backward()
    with torch.no_grad(), HostReads() as decoding:
        _, cache = model(ids[:, :5], return_cache=True)
        for t in range(5, 8):
            _, cache = model(ids[:, t : t + 1], cache=cache, return_cache=True)
    assert training.ops == [] and decoding.ops == []


@pytest.mark.parametrize("name", BUILDERS)
def test_loss_reaches_every_parameter(name):
    model = build(name)
    ids = torch.randint(0, NUM_TOKENS, (2, 12))
    # one step first: hyper-connections start with zero dynamic weights, whose scales then get
    # an exactly zero (but present) gradient
    model(ids, return_loss=True).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    model(ids, return_loss=True).backward()
    for param_name, param in model.named_parameters():
        if not param.requires_grad:  # rotary frequencies are fixed
            continue
        assert param.grad is not None, f"{param_name} received no gradient"
        assert param.grad.abs().sum() > 0, f"{param_name} received a zero gradient"


def influence_beyond_window(model):
    """Max change of the last segment's logits when a token four windows earlier changes."""
    ids = torch.randint(0, NUM_TOKENS, (2, 6 * SEGMENT))
    changed = ids.clone()
    changed[:, SEGMENT + 1] = (changed[:, SEGMENT + 1] + 5) % NUM_TOKENS
    last = slice(5 * SEGMENT, 6 * SEGMENT)
    return (model(changed)[:, last] - model(ids)[:, last]).abs().max().item()


@pytest.mark.parametrize("name", WITH_ATTENTION)
def test_only_the_memory_reaches_beyond_the_window(float64, name):
    # depth 2 attention reaches at most 2 windows back; the token lies 4 windows back
    assert influence_beyond_window(build(name)) > 1e-6
    assert influence_beyond_window(build(name, neural_memory_layers=())) == 0.0


@pytest.mark.parametrize("name", BUILDERS)
def test_bad_inputs_raise(name):
    model = build(name)
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model(torch.tensor([[1, 2, 40]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.randn(1, 5))
    with pytest.raises(ValueError, match="batch, seq"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model(torch.tensor([[1, -1, 3]]))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model(torch.tensor([[1]]), return_loss=True)
    with pytest.raises(TypeError, match="cache"):
        model(torch.tensor([[1]]), cache=("not", "a cache"))
    with pytest.raises(ValueError, match="prompt length"):
        model.sample(torch.randint(0, NUM_TOKENS, (1, 10)), 5)
    with pytest.raises(ValueError, match="depth"):
        build(name, depth=0)


@pytest.mark.parametrize("name", WITH_ATTENTION)
def test_bad_attention_arguments_raise(name):
    with pytest.raises(ValueError, match="neural_memory_layers"):
        build(name, neural_memory_layers=(0, 3))
    for argument in ("segment_len", "heads", "dim_head"):
        with pytest.raises(ValueError, match=argument):
            build(name, **{argument: 0})
    with pytest.raises(ValueError, match="num_persist_mem_tokens"):
        build(name, num_persist_mem_tokens=-1)


def test_sampling_filters():
    model = build("mac")
    prompt = torch.randint(0, NUM_TOKENS, (1, 3))
    for name, kwargs in (("min_p", {}), ("top_k", {"k": 3}), ("top_p", {"thres": 0.8})):
        assert model.sample(prompt, 8, filter_fn=name, filter_kwargs=kwargs).shape == (1, 5)
    # top_k with k = 1 is greedy whatever the temperature
    torch.testing.assert_close(
        model.sample(prompt, 8, filter_fn="top_k", filter_kwargs={"k": 1}), model.sample(prompt, 8, temperature=0.0)
    )


def test_bad_sampling_arguments_raise():
    model = build("mag")
    with pytest.raises(ValueError, match="at least one token"):
        model.sample(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="filter_fn"):
        model.sample(torch.randint(0, NUM_TOKENS, (1, 2)), 5, filter_fn="nucleus")
    with pytest.raises(ValueError, match="temperature"):
        model.sample(torch.randint(0, NUM_TOKENS, (1, 2)), 5, temperature=-1.0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_yields_what_sample_returns(use_cache):
    model = build("mal")
    prompt = torch.randint(0, NUM_TOKENS, (2, 3))
    torch.manual_seed(1)
    sampled = model.sample(prompt, 11, temperature=0.9, use_cache=use_cache)
    torch.manual_seed(1)
    tokens = list(model.generate(prompt, 8, temperature=0.9, use_cache=use_cache))
    assert [tuple(token.shape) for token in tokens] == [(2, 1)] * 8
    assert torch.equal(torch.cat(tokens, dim=1), sampled)
    assert model.training  # eval only while generating
    assert model.sample(prompt, 3).shape == (2, 0)


def test_generate_checks_arguments_at_the_call():
    model = build("lmm")
    prompt = torch.randint(0, NUM_TOKENS, (1, 2))
    with pytest.raises(ValueError, match="num_new_tokens"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, 4, temperature=float("nan"))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(prompt[:, :0], 4)
    tokens = model.generate(prompt, 4)
    next(tokens)
    assert not model.training
    tokens.close()  # stopping early puts the model back in training mode
    assert model.training


COMPILE_SMALL = dict(num_tokens=16, dim=8, depth=1, num_residual_streams=2, neural_memory_kwargs=dict(chunk_size=2, heads=1, dim_head=8))
COMPILE_ATTENTION = dict(segment_len=4, num_persist_mem_tokens=1, heads=1, dim_head=8)
COMPILE_BUILDERS = {
    "mac": lambda: MemoryAsContextTransformer(**COMPILE_SMALL, **COMPILE_ATTENTION, num_longterm_mem_tokens=1),
    "mag": lambda: MemoryAsGateTransformer(**COMPILE_SMALL, **COMPILE_ATTENTION),
    "mal": lambda: MemoryAsLayerTransformer(**COMPILE_SMALL, **COMPILE_ATTENTION),
    "lmm": lambda: MemoryTransformer(**COMPILE_SMALL),
}


def compiled_matches_eager(name, backend):
    torch.manual_seed(0)
    model = COMPILE_BUILDERS[name]()
    ids = torch.randint(0, 16, (1, 7))  # two segments, the second partial; a partial memory chunk
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for run in (model, torch.compile(model, backend=backend)):
        logits = run(ids)
        results.append((logits, torch.autograd.grad(logits.square().sum(), params)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", COMPILE_BUILDERS)
def test_torch_compile_matches_eager(name):
    # dynamo traces the model (the fused memory loop included) and AOTAutograd builds its backward;
    # "aot_eager" runs those graphs without generating kernels (inductor's code generation: the slow test)
    torch._dynamo.reset()
    compiled_matches_eager(name, "aot_eager")


@pytest.mark.slow
def test_torch_compile_with_inductor_matches_eager():
    torch._dynamo.reset()
    compiled_matches_eager("mac", "inductor")
