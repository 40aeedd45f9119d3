"""`FusedHyperConnections` against the hyper-connections library's own forward: values and every
gradient in float64, zero streams, the layouts it hands to the library, what it keeps, autocast."""

import copy

import pytest
import torch
from hyper_connections.hyper_connections import HyperConnections

from titans_pytorch.streams import FusedHyperConnections


def connection(streams, dim, layer_index=1):
    torch.manual_seed(0)
    fused = FusedHyperConnections(streams, dim=dim, layer_index=layer_index)
    with torch.no_grad():  # away from the initial values, where several terms vanish
        for parameter in fused.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return fused


def run(module, forward, x, branch_weight, grad):
    """One hyper-connection around a small branch, then the gradients of everything."""
    module.zero_grad(set_to_none=True)
    branch_input, add_residual = forward(module, x)
    out = add_residual(torch.tanh(branch_input @ branch_weight))
    grads = torch.autograd.grad(out, (x, branch_weight, *module.parameters()), grad)
    return branch_input, out, grads


@pytest.mark.parametrize("streams", [2, 4])
def test_equals_the_librarys_forward_values_and_every_gradient(float64, streams):
    dim, tokens = 16, 7
    fused = connection(streams, dim)
    # a token's streams at norms below F.normalize's eps (1e-12), where the norm is clamped
    scales = torch.tensor([1.0, 1e-3, 1e3, 1.0, 1e-14, 1.0, 1.0]).repeat_interleave(streams)
    x = (torch.randn(tokens * streams, 1, dim) * scales.view(-1, 1, 1))
    x[-1] = 0.0  # and one stream of one token all zero
    x.requires_grad_()
    branch_weight = torch.randn(dim, dim, requires_grad=True)
    grad = torch.randn(tokens * streams, 1, dim)
    library = run(fused, HyperConnections.forward, x, branch_weight, grad)
    ours = run(fused, FusedHyperConnections.forward, x, branch_weight, grad)
    assert ours[0].shape == library[0].shape == (tokens, 1, dim)
    assert ours[1].shape == library[1].shape == x.shape
    for got, expected in zip((ours[0], ours[1], *ours[2]), (library[0], library[1], *library[2])):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-11)
    assert all(torch.isfinite(g).all() for g in ours[2])


def test_half_precision_gradients_stay_finite_at_small_norms():
    # in float16 1 / ||x||^2 overflows below norms of 1/256; the library's gradients stay finite there
    fused = connection(4, 64)
    x = torch.nn.functional.normalize(torch.randn(3 * 4, 1, 64), dim=-1) * torch.tensor([1.0, 3e-3, 1e-3]).repeat_interleave(4).view(-1, 1, 1)
    grads = {}
    for dtype in (torch.float16, torch.float64):
        module, inputs = copy.deepcopy(fused).to(dtype), x.to(dtype).requires_grad_()
        branch_input, add_residual = module(inputs)
        grads[dtype] = torch.autograd.grad(add_residual(branch_input).sum(), inputs)[0]
    assert torch.isfinite(grads[torch.float16]).all()
    torch.testing.assert_close(grads[torch.float16].double(), grads[torch.float64], atol=0.05, rtol=0.02)


def test_a_second_derivative_is_refused_not_wrong(float64):
    fused = connection(2, 8)
    x = torch.randn(3 * 2, 1, 8, requires_grad=True)
    branch_input, add_residual = fused(x)
    (grad,) = torch.autograd.grad(add_residual(torch.tanh(branch_input)).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


def test_a_connection_adds_its_residual_once(float64):
    # add_residual writes into the connection's mix in place: a second call would add twice, so it is refused
    fused = connection(2, 8)
    x = torch.randn(3 * 2, 1, 8)
    branch_input, add_residual = fused(x)
    branch = torch.randn_like(branch_input)
    expected_input, expected_add = HyperConnections.forward(fused, x)
    torch.testing.assert_close(add_residual(branch), expected_add(branch), atol=1e-12, rtol=0)
    with pytest.raises(RuntimeError, match="once per connection"):
        add_residual(branch)


def test_other_layouts_go_through_the_librarys_forward(float64):
    # (batch streams, length, dim) with length > 1: the library's own layout, its own code
    fused = connection(2, 8)
    x = torch.randn(2 * 3, 5, 8)
    branch_input, add_residual = fused(x)
    expected_input, expected_add = HyperConnections.forward(fused, x)
    torch.testing.assert_close(branch_input, expected_input, atol=0, rtol=0)
    branch = torch.randn_like(branch_input)
    torch.testing.assert_close(add_residual(branch), expected_add(branch), atol=0, rtol=0)


def test_keeps_no_copy_of_the_streams_for_the_backward():
    # the library keeps the normalised streams and the whole mix; here only the streams themselves
    # (which the previous layer's output is anyway) and per-token tensors of `streams + 2` columns
    dim, streams, tokens = 64, 4, 32
    fused = connection(streams, dim)
    x = torch.randn(tokens * streams, 1, dim, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        branch_input, add_residual = fused(x)
        add_residual(branch_input * 2)
    others = [t for t in kept if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    assert max(t.numel() for t in others) <= tokens * dim  # at most the branch's size, never the streams'


def test_streams_keep_their_dtype_under_autocast():
    # the library's mix is a matmul, which autocast runs in half precision; the fused connection mixes
    # in the streams' own dtype (the branch casts its input as it likes)
    fused = connection(2, 16)
    x = torch.randn(3 * 2, 1, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        branch_input, add_residual = fused(x)
        out = add_residual(torch.nn.functional.linear(branch_input, torch.randn(16, 16)))
    assert branch_input.dtype == out.dtype == torch.float32
    torch.testing.assert_close(fused(x)[0], branch_input)
