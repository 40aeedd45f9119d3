"""The dual-form chunk loop (`memory/dual.py`): equal to the fused loop (itself tested against the
reference loop and autograd) in values and every gradient, in blocks or not, and free of
weight-sized tensors per chunk."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dispatch import ElementsWritten
from test_memory_fused import MODELS  # the same five networks
from titans_pytorch import MemoryMLP, NeuralMemory, ResidualNormMemory
from titans_pytorch.memory.chunking import update_terms
from titans_pytorch.memory.closed_form import ClosedFormNetwork
from titans_pytorch.memory.dual import dual_chunk_loop, transition_products

def problem(network, batch, chunks, chunk, dim, momentum, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 2 if momentum else 1
    state = 0.5 * torch.randn(batch, rows, network.layout.size, generator=gen)
    keys, values, queries = F.normalize(torch.randn(3, batch, chunks, chunk, dim, generator=gen), dim=-1).unbind(0)
    lr = 0.2 * torch.rand(batch, chunks, chunk, generator=gen)
    log_momentum = F.logsigmoid(torch.randn(batch, chunks, chunk, generator=gen)) if momentum else None
    log_retain = F.logsigmoid(torch.randn(batch, chunks, chunk, generator=gen) + 3)
    return state, keys, values, queries, lr, log_momentum, log_retain


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("block_tokens", [None, 6])
def test_dual_equals_fused_with_every_gradient(float64, model_name, momentum, block_tokens):
    torch.manual_seed(0)
    network = ClosedFormNetwork.of(MODELS[model_name](4))
    inputs = [t.requires_grad_() for t in problem(network, 3, 4, 3, 4, momentum) if t is not None]

    def run(loop):
        state, keys, values, queries, lr, *gates = inputs
        terms = update_terms(lr, *(gates if momentum else (None, *gates)))
        offsets, token_weights = network._residual_terms(keys, values, terms)
        if loop == "dual":
            return dual_chunk_loop(network, state, keys, offsets, token_weights, terms.transitions, queries, block_tokens)
        return dataclasses.replace(network, loop="fused").chunk_loop(state, keys, values, terms, queries)

    dual, fused = run("dual"), run("fused")
    probes = [torch.randn_like(t) for t in fused]
    grads = []
    for out in (dual, fused):
        grads.append(torch.autograd.grad(sum((o * p).sum() for o, p in zip(out, probes)), inputs))
    for a, b in zip(dual, fused):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for a, b in zip(*grads):
        assert b.abs().max() > 0
        # relative too: some gradients reach 2e3, where float64 rounding alone is 1e-10 on some CPUs
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12)


def test_transition_products_are_the_chained_matrices(float64):
    torch.manual_seed(0)
    transitions = torch.rand(2, 4, 2, 2).triu()
    products = transition_products(transitions)
    for j in range(5):
        for i in range(5):
            expected = torch.eye(2).expand(2, 2, 2) if i <= j else torch.zeros(2, 2, 2)
            for t in range(i, j):
                expected = transitions[:, t] @ expected
            torch.testing.assert_close(products[:, j, i], expected, atol=1e-15, rtol=0)


def written_per_chunk(network, chunks, rows=2, batch=2, chunk=2, dim=8):
    state, keys, values, queries, lr, log_momentum, log_retain = problem(network, batch, chunks, chunk, dim, True)
    state.requires_grad_()
    terms = update_terms(lr, log_momentum, log_retain)
    with ElementsWritten() as counter:
        final, reads = network.chunk_loop(state, keys, values, terms, queries)
        (final.sum() + reads.sum()).backward()
    return counter.elements


def test_dual_writes_no_weight_sized_tensor_per_chunk():
    # forward and backward, the elements each chunk more writes: the fused loop writes the whole
    # state (and its adjoint) after every chunk, so its cost per chunk grows with the state, d^2
    # here; the dual form's only with the width d of the tokens' activations
    def per_chunk(loop, dim):
        network = dataclasses.replace(ClosedFormNetwork.of(ResidualNormMemory(dim, depth=2, expansion=1)), loop=loop)
        return (written_per_chunk(network, 8, chunk=1, dim=dim) - written_per_chunk(network, 4, chunk=1, dim=dim)) / 4

    assert per_chunk("fused", 32) > 3.5 * per_chunk("fused", 16)  # the measure sees per-chunk states
    assert per_chunk("dual", 32) < 2.5 * per_chunk("dual", 16)


def test_loop_choice_and_bad_loop():
    network = ClosedFormNetwork.of(MemoryMLP(4))
    large, small = torch.empty(1 << 20), torch.empty(1 << 19)  # states (only their size counts)
    keys = torch.zeros(1, 2, 4, 4)  # (B, N, c, d): chunks of 4 tokens
    assert network.loop_for(large, keys) == "dual"
    assert network.loop_for(small, keys) == "fused"
    assert network.loop_for(large, torch.zeros(1, 2, 8, 4)) == "fused"
    assert dataclasses.replace(network, loop="fused").loop_for(large, keys) == "fused"
    assert dataclasses.replace(network, loop="dual").loop_for(small, keys) == "dual"
    with pytest.raises(ValueError, match="loop must be one of"):
        dataclasses.replace(network, loop="fast")


def test_module_on_either_loop_equal(float64):
    torch.manual_seed(0)
    mem = NeuralMemory(8, chunk_size=2, heads=2, dim_head=4, max_lr=0.5)
    seq = torch.randn(2, 19, 8, requires_grad=True)  # 9 whole chunks (blocks of 32 tokens: 2) and a partial one
    results = []
    for loop in ("dual", "fused"):
        mem.network = dataclasses.replace(mem.network, loop=loop)
        out, state = mem(seq, return_state=True)
        loss = out.square().sum() + state.flat.square().sum()
        results.append([out, state.flat, *torch.autograd.grad(loss, [seq, *mem.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.cuda
def test_dual_on_cuda_equals_cpu_float64():
    torch.manual_seed(0)
    mem = NeuralMemory(32, chunk_size=4, heads=2, dim_head=16)
    seq = torch.randn(2, 22, 32)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        copy = NeuralMemory(32, chunk_size=4, heads=2, dim_head=16).to(device, dtype)
        copy.load_state_dict(mem.state_dict())
        copy.network = dataclasses.replace(copy.network, loop="dual")
        x = seq.to(device, dtype).requires_grad_()
        out = copy(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *copy.parameters()])])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda.cpu().double(), cpu, atol=2e-3, rtol=2e-3)


def test_mac_on_either_loop_equal(float64):
    # the whole model, segment by segment, memory layers on the dual form and on the fused loop
    from titans_pytorch import MemoryAsContextTransformer

    torch.manual_seed(0)
    model = MemoryAsContextTransformer(num_tokens=32, dim=16, depth=2, segment_len=4, num_persist_mem_tokens=2,
                                       num_longterm_mem_tokens=2, heads=2, dim_head=8, num_residual_streams=2,
                                       neural_memory_kwargs=dict(chunk_size=2, heads=2, dim_head=8))
    ids = torch.randint(0, 32, (2, 21))
    memories = [m for m in model.modules() if isinstance(m, NeuralMemory)]
    results = []
    for loop in ("dual", "fused"):
        for mem in memories:
            mem.network = dataclasses.replace(mem.network, loop=loop)
        loss = model(ids, return_loss=True)
        params = [p for p in model.parameters() if p.requires_grad]
        results.append([loss, *torch.autograd.grad(loss, params)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
