"""The chunked update (`memory/chunking.py`) through every path against the plain loop (`memory/naive.py`):
the fused and dual-form loops and the autograd-differentiated closed form of the built-in networks,
and the `torch.func` path that serves any network."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from titans_pytorch import LinearMemory, MemoryMLP, ResidualNormMemory
from titans_pytorch.memory.chunking import chunk_coefficients, clip_factors, run_chunks, sequential_states, update_terms
from titans_pytorch.memory.closed_form import ClosedFormNetwork
from titans_pytorch.memory.functional import TorchFuncNetwork
from titans_pytorch.memory.naive import memory_reference

MODELS = {
    "linear": lambda d: LinearMemory(d),
    "mlp2": lambda d: MemoryMLP(d, depth=2, expansion=2),
    "residual_norm": lambda d: ResidualNormMemory(d, depth=2, expansion=2),
}


class AutogradClosedForm(ClosedFormNetwork):
    """The closed form, its chunk loop differentiated by autograd instead of the fused backward."""

    def chunk_states(self, state, keys, values, terms):
        return sequential_states(self, state, keys, values, terms)


def networks(model):
    closed = ClosedFormNetwork.of(model)
    return {
        "fused": dataclasses.replace(closed, loop="fused"),
        "dual": dataclasses.replace(closed, loop="dual"),
        "closed_form_autograd": AutogradClosedForm(closed.layout, closed.matrix_names, closed.scale_name, loop="fused"),
        "torch_func": TorchFuncNetwork(model),
    }


PATHS = ["fused", "dual", "closed_form_autograd", "torch_func"]


def random_problem(model, heads, length, momentum, forget, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = next(model.parameters()).shape[0]
    weights = {n: p.detach()[None].repeat(heads, *([1] * p.ndim)) for n, p in model.named_parameters()}
    weights = {n: w + 0.1 * torch.randn(w.shape, generator=gen) for n, w in weights.items()}
    mom = {n: 0.05 * torch.randn(w.shape, generator=gen) for n, w in weights.items()} if momentum else None
    keys, values, queries = F.normalize(torch.randn(3, heads, length, dim, generator=gen), dim=-1).unbind(0)
    lr = 0.2 * torch.rand(heads, length, generator=gen)
    log_mom = F.logsigmoid(torch.randn(heads, length, generator=gen) + 1) if momentum else None
    log_ret = F.logsigmoid(torch.randn(heads, length, generator=gen) + 3) if forget else None
    return weights, mom, keys, values, queries, lr, log_mom, log_ret


def run_fast(network, problem, chunk, refresh_every=1, max_grad_norm=None):
    """The chunked path on a reference problem: returns weights and momentum by name, and the reads."""
    weights, mom, keys, values, queries, lr, log_mom, log_ret = problem
    heads, length = keys.shape[:2]
    n = length // chunk

    def chunked(t):
        return None if t is None else t.reshape(heads, n, chunk, *t.shape[2:])

    layout = network.layout
    rows = [layout.flatten(weights, leading=1)] + ([layout.flatten(mom, leading=1)] if mom is not None else [])
    terms = update_terms(chunked(lr), chunked(log_mom), chunked(log_ret))
    state, reads = run_chunks(network, torch.stack(rows, dim=1), chunked(keys), chunked(values), terms,
                              chunked(queries), refresh_every, max_grad_norm)
    momentum = layout.views(state[:, 1]) if mom is not None else None
    return layout.views(state[:, 0]), momentum, reads.reshape(heads, length, -1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("chunk", [1, 4])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("forget", [True, False])
@pytest.mark.parametrize("heads", [1, 3])
def test_chunked_equals_reference_loop(float64, path, model_name, chunk, momentum, forget, heads):
    model = MODELS[model_name](6)
    forward_fn = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    problem = random_problem(model, heads, 16, momentum, forget)
    fast = run_fast(networks(model)[path], problem, chunk)
    weights, mom, keys, values, queries, lr, log_mom, log_ret = problem
    ref = memory_reference(forward_fn, weights, mom, keys, values, queries, lr, log_mom, log_ret, chunk_size=chunk)
    torch.testing.assert_close(fast[2], ref[2], atol=1e-9, rtol=0)
    for name in weights:
        torch.testing.assert_close(fast[0][name], ref[0][name], atol=1e-9, rtol=0)
        if momentum:
            torch.testing.assert_close(fast[1][name], ref[1][name], atol=1e-9, rtol=0)


@pytest.mark.parametrize("path", ["fused", "torch_func"])
@pytest.mark.parametrize("chunk,refresh_every", [(2, 3), (4, 2), (1, 4)])
@pytest.mark.parametrize("momentum", [True, False])
def test_refresh_spans_equal_reference_loop(float64, path, chunk, refresh_every, momentum):
    model = MODELS["residual_norm"](6)
    forward_fn = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    problem = random_problem(model, 2, 24, momentum, True, seed=1)
    fast = run_fast(networks(model)[path], problem, chunk, refresh_every)
    weights, mom, keys, values, queries, lr, log_mom, log_ret = problem
    ref = memory_reference(
        forward_fn, weights, mom, keys, values, queries, lr, log_mom, log_ret, chunk_size=chunk, refresh_every=refresh_every
    )
    torch.testing.assert_close(fast[2], ref[2], atol=1e-9, rtol=0)
    for name in weights:
        torch.testing.assert_close(fast[0][name], ref[0][name], atol=1e-9, rtol=0)


@pytest.mark.parametrize("path", ["fused", "torch_func"])
@pytest.mark.parametrize("model_name", ["mlp2", "residual_norm"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_clipped_gradients_equal_reference_loop(float64, path, model_name, chunk):
    model = MODELS[model_name](6)
    forward_fn = lambda p, x: functional_call(model, p, (x,))  # noqa: E731
    problem = random_problem(model, 2, 16, True, True, seed=2)
    network = networks(model)[path]
    fast = run_fast(network, problem, chunk, max_grad_norm=0.05)
    weights, mom, keys, values, queries, lr, log_mom, log_ret = problem
    ref = memory_reference(
        forward_fn, weights, mom, keys, values, queries, lr, log_mom, log_ret, chunk_size=chunk, max_grad_norm=0.05
    )
    torch.testing.assert_close(fast[2], ref[2], atol=1e-10, rtol=0)
    unclipped = run_fast(network, problem, chunk)
    assert not torch.allclose(unclipped[2], fast[2]), "the clip threshold must be active in this test"


def test_clip_factors_never_inflate_and_keep_zero():
    norms = torch.tensor([0.0, 0.5, 1.0, 2.0, 1e30])
    factors = clip_factors(norms, 1.0)
    assert torch.all(factors <= 1) and factors[0] == 1 and factors[1] == 1
    assert torch.all(norms * factors <= 1.0 + 1e-6)
    torch.testing.assert_close(norms[3] * factors[3], torch.tensor(1.0))


def test_coefficients_are_finite_for_extreme_decays(float64):
    # decays compound in log space: a product that underflows must give 0, never NaN or inf
    lr = torch.full((64,), 0.5)
    log_momentum = torch.full((64,), -50.0)
    log_retain = torch.full((64,), -30.0)
    coeffs = chunk_coefficients(lr, log_momentum, log_retain)
    for value in vars(coeffs).values():
        assert torch.isfinite(value).all()
    assert coeffs.log_weight_decay.exp() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_coefficient_gradients_are_finite_for_extreme_decays(dtype):
    # the reverse log-cumsum-exp and its backward at decays whose products underflow
    gates = [torch.full((4, 64), value, dtype=dtype, requires_grad=True) for value in (0.5, -50.0, -30.0)]
    coeffs = chunk_coefficients(*gates)
    sum(value.sum() for value in vars(coeffs).values()).backward()
    for value in (*vars(coeffs).values(), *(gate.grad for gate in gates)):
        assert torch.isfinite(value).all()
    assert coeffs.grad_to_weights.abs().max() > 0
