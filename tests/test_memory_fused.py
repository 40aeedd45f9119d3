"""The fused chunk loop (`memory/fused.py`): its hand-written backward against autograd through the
closed form it fuses, and end to end against the `torch.func` path. On a CPU the module picks the
dual form for short chunks, so these tests pin the fused loop (`pin_fused`)."""

import dataclasses
import gc
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dispatch import Created
from titans_pytorch import LinearMemory, MemoryMLP, NeuralMemory, ResidualNormMemory
from titans_pytorch.memory.chunking import sequential_states, update_terms
from titans_pytorch.memory.closed_form import ClosedFormNetwork
from titans_pytorch.memory.functional import TorchFuncNetwork
from titans_pytorch.memory.fused import FusedChunkLoop

def pin_fused(mem):
    """`mem` running the fused loop whatever the device and chunk size."""
    mem.network = dataclasses.replace(mem.network, loop="fused")
    return mem


MODELS = {
    "linear": lambda d: LinearMemory(d),
    "mlp2": lambda d: MemoryMLP(d, depth=2, expansion=2),
    "mlp3": lambda d: MemoryMLP(d, depth=3, expansion=2),
    "residual_norm": lambda d: ResidualNormMemory(d, depth=2, expansion=2),
    "residual_norm_linear": lambda d: ResidualNormMemory(d, model=LinearMemory(d)),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("momentum", [True, False])
def test_fused_backward_equals_autograd(float64, model_name, momentum):
    torch.manual_seed(0)
    network = ClosedFormNetwork.of(MODELS[model_name](4))
    batch, chunks, chunk, dim, rows = 3, 4, 5, 4, 2 if momentum else 1
    state = 0.5 * torch.randn(batch, rows, network.layout.size)
    keys = F.normalize(torch.randn(batch, chunks, chunk, dim), dim=-1)
    values = torch.randn(batch, chunks, chunk, dim)
    lr = 0.1 * torch.rand(batch, chunks, chunk)
    log_momentum = F.logsigmoid(torch.randn(batch, chunks, chunk)) if momentum else None
    log_retain = F.logsigmoid(torch.randn(batch, chunks, chunk) + 3)
    inputs = [t.requires_grad_() for t in (state, keys, values, lr, log_retain)]
    if momentum:
        inputs.append(log_momentum.requires_grad_())

    def outputs(run):
        terms = update_terms(lr, log_momentum, log_retain)
        return run(state, keys, values, terms)

    fused = outputs(network.chunk_states)
    reference = outputs(lambda *args: sequential_states(network, *args))
    probes = [torch.randn_like(t) for t in reference]
    grads = {}
    for name, out in (("fused", fused), ("reference", reference)):
        torch.testing.assert_close(out[0], reference[0], atol=1e-12, rtol=0)
        torch.testing.assert_close(out[1], reference[1], atol=1e-12, rtol=0)
        loss = sum((o * p).sum() for o, p in zip(out, probes))
        grads[name] = torch.autograd.grad(loss, inputs)
    for fused_grad, reference_grad in zip(grads["fused"], grads["reference"]):
        assert reference_grad.abs().max() > 0
        torch.testing.assert_close(fused_grad, reference_grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("model_name", ["linear", "mlp2", "residual_norm"])
def test_module_gradients_equal_torch_func_path(float64, model_name):
    # the whole module (projections, gates, reads, output) on both paths
    torch.manual_seed(0)
    mem = pin_fused(NeuralMemory(8, chunk_size=3, heads=2, dim_head=4, model=MODELS[model_name](4), max_lr=0.5))
    seq = torch.randn(2, 11, 8, requires_grad=True)  # 3 whole chunks and a partial one
    grads = []
    for network in (mem.network, TorchFuncNetwork(mem.model)):
        mem.network = network
        out, state = mem(seq, return_state=True)
        loss = out.square().sum() + state.flat.square().sum()
        grads.append(torch.autograd.grad(loss, [seq, *mem.parameters()]))
    for fused, generic in zip(*grads):
        torch.testing.assert_close(fused, generic, atol=1e-10, rtol=0)


def test_loops_chained_in_one_backward_pass_equal_torch_func_path(float64):
    # memory as context runs one fused loop per segment; on a CPU the loops of one backward pass
    # share one adjoint buffer, so chained calls of the same shape, and a second pass, must not mix
    torch.manual_seed(0)
    mem = pin_fused(NeuralMemory(8, chunk_size=3, heads=2, dim_head=4, model=MODELS["residual_norm"](4), max_lr=0.5))
    seq = torch.randn(2, 18, 8, requires_grad=True)

    def grads(network):
        mem.network = network
        state, outputs = None, []
        for piece in seq.split(6, dim=1):  # three calls of two chunks each: the same buffer shape
            out, state = mem(piece, state=state, return_state=True)
            outputs.append(out)
        loss = torch.cat(outputs, dim=1).square().sum() + state.flat.square().sum()
        return torch.autograd.grad(loss, [seq, *mem.parameters()])

    fused = mem.network
    first, second, generic = grads(fused), grads(fused), grads(TorchFuncNetwork(mem.model))
    for a, b, reference in zip(first, second, generic):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, reference, atol=1e-10, rtol=1e-9)


def test_backward_frees_the_loops_buffers_and_retain_graph_keeps_them():
    torch.manual_seed(0)
    mem = pin_fused(NeuralMemory(8, chunk_size=2, heads=2, dim_head=4))
    seq = torch.randn(2, 16, 8, requires_grad=True)
    with Created() as created:
        loss = mem(seq).square().sum()
    loss.backward()
    gc.collect()
    # the loss is still alive (as a training loop's last loss is while the next step runs); what the
    # forward made for the backward (every chunk's state, activations, ...) is not
    alive = created.alive(loss)
    assert not alive, f"{len(alive)} tensors of the forward pass still alive: {[tuple(t.shape) for t in alive]}"

    loss = mem(seq).square().sum()
    first = torch.autograd.grad(loss, seq, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(loss, seq)[0], first, atol=0, rtol=0)


def test_shared_adjoint_buffer_released_after_a_failed_backward_pass():
    torch.manual_seed(0)
    mem = pin_fused(NeuralMemory(8, chunk_size=2, heads=2, dim_head=4))
    seq = torch.randn(2, 8, 8, requires_grad=True)

    def fail(grad):
        raise RuntimeError("a hook failed")

    with Created() as created:
        handle = seq.register_hook(fail)  # runs after the fused loop's backward
        with pytest.raises(RuntimeError, match="a hook failed"):
            torch.autograd.grad(mem(seq).sum(), seq)
        handle.remove()
        grad = torch.autograd.grad(mem(seq).sum(), seq)[0]
    gc.collect()
    alive = created.alive(grad)
    assert not alive, f"{len(alive)} tensors still alive: {[tuple(t.shape) for t in alive]}"


@pytest.mark.cuda
def test_fused_path_on_cuda_equals_cpu_float64():
    torch.manual_seed(0)
    mem = pin_fused(NeuralMemory(32, chunk_size=4, heads=2, dim_head=16))
    seq = torch.randn(2, 22, 32)
    results = []
    for device, dtype in (("cpu", torch.float64), ("cuda", torch.float32)):
        copy = NeuralMemory(32, chunk_size=4, heads=2, dim_head=16).to(device, dtype)
        copy.load_state_dict(mem.state_dict())
        x = seq.to(device, dtype).requires_grad_()
        out = copy(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *copy.parameters()])
        results.append([out, *grads])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda.cpu().double(), cpu, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("size", ["small", "large"])
def test_fused_float32_on_either_gelu_kernel(size):
    # below 2^15 hidden elements per chunk the loop runs aten's GELU kernels instead of oneDNN's;
    # either way float32 matches the float64 computation, and oneDNN's switch is left as found
    torch.manual_seed(0)
    heads, dim_head, chunk = (2, 4, 4) if size == "small" else (2, 64, 64)
    mem = pin_fused(NeuralMemory(heads * dim_head, chunk_size=chunk, heads=heads, dim_head=dim_head))
    seq = torch.randn(1, 2 * chunk, heads * dim_head)
    results = []
    for dtype in (torch.float64, torch.float32):
        copy = pin_fused(NeuralMemory(heads * dim_head, chunk_size=chunk, heads=heads, dim_head=dim_head).to(dtype))
        copy.load_state_dict(mem.state_dict())
        x = seq.to(dtype).requires_grad_()
        out = copy(x)
        results.append([out, *torch.autograd.grad(out.square().sum(), [x, *copy.parameters()])])
    assert torch.backends.mkldnn.enabled
    for reference, value in zip(*results):
        torch.testing.assert_close(value.double(), reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("momentum, forward_ops, backward_ops", [(True, 16, 29), (False, 16, 26)])
def test_a_chunk_of_the_default_network_dispatches_a_fixed_number_of_ops(momentum, forward_ops, backward_ops):
    # the loop's host work per chunk, whatever the number of chunks (issue 12's bar: 60 forward and
    # backward together), counted as bench_memory.py counts it (its DispatchCounter)
    spec = importlib.util.spec_from_file_location(
        "bench_memory", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_memory.py")
    bench_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_memory)
    torch.manual_seed(0)
    network = ClosedFormNetwork.of(ResidualNormMemory(8))  # the default network
    rows = 2 if momentum else 1

    def ops(chunks):
        state = torch.randn(2, rows, network.layout.size, requires_grad=True)
        keys, offsets = (torch.randn(2, chunks, 4, 8, requires_grad=True) for _ in range(2))
        token_weights = torch.randn(2, chunks, 4, rows, requires_grad=True)
        transitions = torch.randn(2, chunks, rows, rows, requires_grad=True)
        with bench_memory.DispatchCounter() as forward:
            starts, final = FusedChunkLoop.apply(network, state, keys, offsets, token_weights, transitions)
        loss = starts.square().sum() + final.square().sum()
        starts_grad, final_grad = torch.autograd.grad(loss, (starts, final), retain_graph=True)
        with bench_memory.DispatchCounter() as backward:
            torch.autograd.backward((starts, final), (starts_grad, final_grad))
        return forward.compute, backward.compute

    (forward_2, backward_2), (forward_6, backward_6) = ops(2), ops(6)
    assert ((forward_6 - forward_2) / 4, (backward_6 - backward_2) / 4) == (forward_ops, backward_ops)


def test_onednn_switch_left_as_the_user_set_it():
    mem = pin_fused(NeuralMemory(8, chunk_size=4, heads=2, dim_head=4))
    x = torch.randn(1, 8, 8, requires_grad=True)
    torch.backends.mkldnn.enabled = False
    try:
        mem(x).sum().backward()
        assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True
    mem(x).sum().backward()
    assert torch.backends.mkldnn.enabled
