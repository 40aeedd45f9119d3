"""NeuralMemory end to end: reference math, causality, streaming, gradients, numerics, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from titans_pytorch import LinearMemory, MemoryMLP, NeuralMemory, NeuralMemoryState
from titans_pytorch.memory.naive import memory_reference


def small_memory(**kwargs):
    config = dict(dim=8, chunk_size=3, heads=2, dim_head=4)
    config.update(kwargs)
    torch.manual_seed(0)
    return NeuralMemory(**config)


def reference_forward(mem, seq):
    """The module's own projections, then the plain per-token loop, then its output layer."""
    state = mem.init_state(seq.shape[0], dtype=seq.dtype)
    x = mem.norm(seq)
    queries, _ = mem._queries(x, state)
    keys, values, gates, _ = mem._keys_values_gates(x, state)
    flat = lambda t: None if t is None else t.flatten(0, 1)  # noqa: E731
    weights = {n: w.flatten(0, 1) for n, w in state.weights.items(include_nested=True, leaves_only=True)}
    momentum = None
    if state.momentum is not None:
        momentum = {n: w.flatten(0, 1) for n, w in state.momentum.items(include_nested=True, leaves_only=True)}
    _, _, retrieved = memory_reference(
        lambda p, x: functional_call(mem.model, p, (x,)), weights, momentum, flat(keys), flat(values), flat(queries), flat(gates["lr"]),
        flat(gates.get("log_momentum")), flat(gates.get("log_retain")), chunk_size=mem.chunk_size,
        refresh_every=mem.refresh_every, max_grad_norm=mem.max_grad_norm,
    )
    return mem._output(retrieved.view(*queries.shape), x)


@pytest.mark.parametrize("chunk_size", [1, 3])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("forget", [True, False])
@pytest.mark.parametrize("heads", [1, 2])
def test_module_equals_reference_loop(float64, chunk_size, momentum, forget, heads):
    mem = small_memory(chunk_size=chunk_size, momentum=momentum, forget=forget, heads=heads, max_lr=0.5)
    seq = torch.randn(2, 10, 8)  # 10 is not a multiple of 3: the last chunk is partial
    torch.testing.assert_close(mem(seq), reference_forward(mem, seq), atol=1e-9, rtol=0)


@pytest.mark.parametrize("model", ["linear", "mlp2"])
def test_module_with_other_memory_models_equals_reference(float64, model):
    net = LinearMemory(4) if model == "linear" else MemoryMLP(4, depth=2)
    mem = small_memory(model=net, max_lr=0.5)
    seq = torch.randn(2, 9, 8)
    torch.testing.assert_close(mem(seq), reference_forward(mem, seq), atol=1e-9, rtol=0)


@pytest.mark.parametrize("chunk_size,refresh_every", [(3, 1), (1, 1), (2, 3)])
def test_causality(float64, chunk_size, refresh_every):
    mem = small_memory(chunk_size=chunk_size, refresh_every=refresh_every)
    seq = torch.randn(2, 14, 8)
    out = mem(seq)
    for t in (0, 4, 7, 13):
        changed = seq.clone()
        changed[:, t] += torch.randn(2, 8)
        out_changed = mem(changed)
        assert torch.equal(out_changed[:, :t], out[:, :t]), f"token {t} changed an earlier output"
        assert not torch.allclose(out_changed[:, t], out[:, t])


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_streaming_equals_one_call(float64, chunk_size):
    mem = small_memory(chunk_size=chunk_size)
    seq = torch.randn(2, 23, 8)
    whole, whole_state = mem(seq, return_state=True)

    gen = torch.Generator().manual_seed(3)
    cuts = sorted(torch.randperm(22, generator=gen)[:6].add(1).tolist())
    state, pieces = None, []
    for start, end in zip([0, *cuts], [*cuts, 23]):
        out, state = mem(seq[:, start:end], state=state, return_state=True)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-10, rtol=0)

    state, tokens = None, []
    for t in range(23):
        out, state = mem(seq[:, t : t + 1], state=state, return_state=True)
        tokens.append(out)
    torch.testing.assert_close(torch.cat(tokens, dim=1), whole, atol=1e-10, rtol=0)
    assert state.position == whole_state.position == 23
    for name, weight in whole_state.weights.items(include_nested=True, leaves_only=True):
        torch.testing.assert_close(state.weights[name], weight, atol=1e-10, rtol=0)


@pytest.mark.parametrize("conv_kernel_size,value_l2norm", [(4, True), (None, True), (4, False)])
def test_pieces_written_at_addresses_equal_one_call_with_key_seq(float64, conv_kernel_size, value_l2norm):
    # memory as context: keys and queries of a whole call from the tokens, computed once
    # (`addresses`), then values written piece by piece, continuing a state from an earlier call;
    # the same outputs, state (conv caches included) and gradients as one call with key_seq
    mem = small_memory(chunk_size=4, conv_kernel_size=conv_kernel_size, value_l2norm=value_l2norm)
    seq = torch.randn(2, 30, 8, requires_grad=True)
    tokens = torch.randn(2, 30, 8, requires_grad=True)
    _, before = mem(torch.randn(2, 7, 8), return_state=True)  # a state mid-chunk, with conv caches
    before = before.detach()
    whole, whole_state = mem(seq, state=before, return_state=True, key_seq=tokens)
    # addressed by its own tokens, it is the plain forward (keys and values from one projection, one convolution)
    own, own_state = mem(seq, state=before, return_state=True, key_seq=seq)
    plain, plain_state = mem(seq, state=before, return_state=True)
    torch.testing.assert_close(own, plain, atol=1e-12, rtol=0)
    torch.testing.assert_close(own_state.flat, plain_state.flat, atol=1e-12, rtol=0)
    for name, cache in plain_state.conv.items():  # (one projection there, the keys' and values' apart here)
        torch.testing.assert_close(own_state.conv[name], cache, atol=1e-12, rtol=0)

    sizes = [5, 11, 1, 13]
    addresses = mem.addresses(tokens, before)
    torch.testing.assert_close(addresses.read_queries, mem.read_queries(tokens)[1], atol=0, rtol=0)
    state, outputs = before, []
    for piece, seq_piece in zip(addresses.split(sizes), seq.split(sizes, dim=1)):
        out, state = mem(seq_piece, state=state, return_state=True, addresses=piece)
        outputs.append(out)
    pieces = torch.cat(outputs, dim=1)
    torch.testing.assert_close(pieces, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(state.flat, whole_state.flat, atol=1e-12, rtol=0)
    assert state.position == whole_state.position == 37
    for name, pending in whole_state.pending.items():  # 37 tokens: one pending after 9 chunks of 4
        torch.testing.assert_close(state.pending[name], pending, atol=1e-12, rtol=0)
    assert set(state.conv) == set(whole_state.conv) == ({"query", "key", "value"} if conv_kernel_size else set())
    for name, cache in whole_state.conv.items():
        torch.testing.assert_close(state.conv[name], cache, atol=0, rtol=0)
        # a state keeps its caches, not the whole stretch's convolution inputs (33 rows of each sequence;
        # at most the last piece's 16 for the values, and key and value caches side by side in one call)
        row = cache[0, 0].numel() * cache.element_size()
        assert cache.untyped_storage().nbytes() <= 2 * 16 * 2 * row
        assert state.conv[name].untyped_storage().nbytes() <= 2 * 16 * 2 * row
    weights = torch.randn_like(whole)
    expected = torch.autograd.grad((whole * weights).sum(), (seq, tokens, *mem.parameters()), allow_unused=True)
    got = torch.autograd.grad((pieces * weights).sum(), (seq, tokens, *mem.parameters()), allow_unused=True)
    for (name, _), e, g in zip([("seq", 0), ("tokens", 0), *mem.named_parameters()], expected, got):
        assert (e is None) == (g is None), name
        if e is not None:
            torch.testing.assert_close(g, e, atol=1e-12, rtol=0, msg=name)


def test_bad_addresses_raise():
    mem = small_memory()
    addresses = mem.addresses(torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match="not both"):
        mem(torch.randn(2, 10, 8), key_seq=torch.randn(2, 10, 8), addresses=addresses)
    with pytest.raises(TypeError, match="got Tensor"):
        mem(torch.randn(2, 10, 8), addresses=addresses.keys)
    with pytest.raises(ValueError, match="seq's 6 tokens of 2 sequences.*got those of 10 tokens of 2"):
        mem(torch.randn(2, 6, 8), addresses=addresses)
    with pytest.raises(ValueError, match="seq's 10 tokens of 3 sequences.*got those of 10 tokens of 2"):
        mem(torch.randn(3, 10, 8), addresses=addresses)
    with pytest.raises(ValueError, match="2 heads of 8.*got those of 10 tokens of 2 sequences, 2 heads of 4"):
        small_memory(dim_head=8)(torch.randn(2, 10, 8), addresses=addresses)
    first, second = addresses.split([4, 6])
    _, state = mem(torch.randn(2, 4, 8), addresses=first, return_state=True)
    with pytest.raises(ValueError, match="position 0 but the state is at 4"):
        mem(torch.randn(2, 4, 8), state=state, addresses=first)  # a piece written twice
    with pytest.raises(ValueError, match="position 4 but the state is at 0"):
        mem(torch.randn(2, 6, 8), addresses=second)  # out of order
    with pytest.raises(ValueError, match="dim=8"):
        mem.addresses(torch.randn(2, 10, 7))


def delta_rule_loop(mem, seq):
    """Linear memory without momentum is a gated delta rule on the gradient point:
    W <- a_t W + beta_t k_t^T (v_t - k_t W_point), beta_t = 2 theta_t, read o_t = q_t W_chunk_start."""
    state = mem.init_state(seq.shape[0], dtype=seq.dtype)
    x = mem.norm(seq)
    queries, _ = mem._queries(x, state)
    keys, values, gates, _ = mem._keys_values_gates(x, state)
    beta = 2 * gates["lr"]
    retain = gates["log_retain"].exp()
    weight = state.weights["weights.0"].clone()  # (b, h, d, d), M(k) = k W
    outputs = torch.zeros_like(queries)
    point = weight
    for t in range(seq.shape[1]):
        if t % mem.chunk_size == 0:
            point = weight.clone()
        outputs[:, :, t] = torch.einsum("bhd,bhde->bhe", queries[:, :, t], point)
        error = values[:, :, t] - torch.einsum("bhd,bhde->bhe", keys[:, :, t], point)
        outer = torch.einsum("bhd,bhe->bhde", keys[:, :, t], error)
        weight = retain[:, :, t, None, None] * weight + beta[:, :, t, None, None] * outer
    return mem._output(outputs, x)


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_linear_memory_without_momentum_is_gated_delta_rule(float64, chunk_size):
    mem = small_memory(model=LinearMemory(4), momentum=False, chunk_size=chunk_size, max_lr=0.5)
    seq = torch.randn(2, 13, 8)
    torch.testing.assert_close(mem(seq), delta_rule_loop(mem, seq), atol=1e-10, rtol=0)


def test_gradient_reaches_every_parameter():
    mem = small_memory(heads=2)
    seq = torch.randn(2, 10, 8, requires_grad=True)
    out, state = mem(seq, return_state=True)
    loss = out.square().mean() + sum(w.square().sum() for w in state.weights.values(True, True))
    loss.backward()
    for name, param in mem.named_parameters():
        assert param.grad is not None, f"{name} received no gradient"
        assert param.grad.abs().sum() > 0, f"{name} received a zero gradient"
    assert seq.grad.abs().sum() > 0


def test_state_detach_allows_truncated_backprop():
    mem = small_memory()
    seq = torch.randn(2, 12, 8)
    state = None
    for piece in seq.split(6, dim=1):
        out, state = mem(piece, state=state, return_state=True)
        out.sum().backward()  # would raise "backward through the graph a second time" without detach
        state = state.detach()
    assert all(not w.requires_grad for w in state.weights.values(True, True))


def test_bf16_autocast_keeps_inner_loop_float32():
    mem = small_memory()
    seq = torch.randn(2, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = mem(seq, return_state=True)
    assert torch.isfinite(out).all()
    assert all(w.dtype == torch.float32 for w in state.weights.values(True, True))
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mem.parameters() if p.grad is not None)


def test_stable_on_8k_random_tokens():
    torch.manual_seed(0)
    mem = NeuralMemory(dim=256, heads=4, dim_head=64, chunk_size=16)
    with torch.no_grad():
        out, state = mem(torch.randn(1, 8192, 256), return_state=True)
    assert torch.isfinite(out).all() and out.abs().max() < 50
    assert all(torch.isfinite(w).all() and w.abs().max() < 100 for w in state.weights.values(True, True))


def test_seed_example_shapes_and_single_token():
    mem = NeuralMemory(dim=16, chunk_size=4, pre_rmsnorm=True)
    seq = torch.randn(2, 10, 16)
    assert mem(seq).shape == seq.shape
    assert mem(seq[:, :1]).shape == (2, 1, 16)


def test_retrieve_and_store_compose_to_forward(float64):
    # forward = per chunk, read at the chunk start, then write: with one chunk both halves agree
    mem = small_memory(chunk_size=4)
    seq = torch.randn(2, 4, 8)
    out, state = mem(seq, return_state=True)
    read, _ = mem.retrieve(seq)
    torch.testing.assert_close(out, read)
    stored = mem.store(seq)
    for name, weight in state.weights.items(True, True):
        torch.testing.assert_close(stored.weights[name], weight)


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return x @ self.weight * self.scale


class Shrinks(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2))

    def forward(self, x):
        return x @ self.weight


class MixesTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return (x @ self.weight).cumsum(-2)


class DeadParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.unused = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x @ self.weight


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=-2), ValueError, "chunk_size"),
        (dict(heads=3, dim_head=None), ValueError, "divisible by heads"),
        (dict(max_lr=0.0), ValueError, "max_lr"),
        (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm"),
        (dict(scan_backend="fastest"), ValueError, "scan_backend"),
        (dict(model=WithBuffer()), ValueError, "buffers"),
        (dict(model=Shrinks()), ValueError, "must map"),
        (dict(model=MixesTokens()), ValueError, "independently"),
        (dict(model=DeadParameter()), ValueError, "do not take part"),
        (dict(model="mlp"), TypeError, "nn.Module"),
    ],
)
def test_bad_construction_raises(kwargs, error, match):
    with pytest.raises(error, match=match):
        small_memory(**kwargs)


def test_bad_inputs_raise():
    mem = small_memory()
    with pytest.raises(ValueError, match="batch, seq_len, dim=8"):
        mem(torch.randn(10, 8))
    with pytest.raises(ValueError, match="dim=8"):
        mem(torch.randn(2, 10, 7))
    with pytest.raises(TypeError, match="floating point"):
        mem(torch.ones(2, 10, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="NeuralMemoryState"):
        mem(torch.randn(2, 10, 8), state={"weights": 1})
    _, state = mem(torch.randn(2, 5, 8), return_state=True)
    with pytest.raises(ValueError, match="does not belong"):
        mem(torch.randn(3, 5, 8), state=state)  # other batch size
    other = small_memory(dim_head=8)
    with pytest.raises(ValueError, match="does not belong"):
        other(torch.randn(2, 5, 8), state=state)
    no_momentum = small_memory(momentum=False)
    with pytest.raises(ValueError, match="momentum"):
        no_momentum(torch.randn(2, 5, 8), state=state)
    assert isinstance(state, NeuralMemoryState)


def test_l2_normalize_matches_torch_normalize(float64):
    from titans_pytorch.neural_memory import l2_normalize

    x = torch.randn(3, 5, 4, 8)
    x[0, 0, 0] = 0  # a zero row stays zero
    x[1, 2, 3] = 1e-14  # below eps: divided by eps, as F.normalize does
    x.requires_grad_()
    probe = torch.randn_like(x)
    ours, reference = l2_normalize(x), torch.nn.functional.normalize(x, dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)
    assert torch.equal(ours[0, 0, 0], torch.zeros(8, dtype=x.dtype))
    grads = [torch.autograd.grad((out * probe).sum(), x)[0] for out in (l2_normalize(x), reference)]
    torch.testing.assert_close(grads[0][1:], grads[1][1:], atol=1e-10, rtol=1e-10)
    half = l2_normalize(x.detach().bfloat16())
    assert half.dtype == torch.float32


def test_short_pieces_of_the_causal_convolution_equal_the_convolution(float64):
    # decoding steps (up to CausalDepthwiseConv.SHORT new positions) take a multiply-and-sum over the
    # windows, longer pieces the depthwise convolution: streamed in pieces of both, the same outputs
    from titans_pytorch.neural_memory import CausalDepthwiseConv

    torch.manual_seed(0)
    conv = CausalDepthwiseConv(6, 4)
    x = torch.randn(2, 60, 6, requires_grad=True)
    cache = torch.zeros(2, 3, 6)
    full, _ = conv(x, cache)  # 60 new positions: the convolution
    expected = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), conv.conv.weight, groups=6).transpose(1, 2)
    torch.testing.assert_close(full, expected, atol=1e-12, rtol=0)
    outputs, start = [], 0
    for length in (1, 16, 17, 3, 23):
        out, inputs = conv(x[:, start : start + length], cache)
        cache = inputs[:, length:]
        outputs.append(out)
        start += length
    streamed = torch.cat(outputs, dim=1)
    torch.testing.assert_close(streamed, full, atol=1e-12, rtol=0)
    (grad_full,) = torch.autograd.grad(full.square().sum(), x)
    (grad_streamed,) = torch.autograd.grad(streamed.square().sum(), x)
    torch.testing.assert_close(grad_streamed, grad_full, atol=1e-12, rtol=0)
