import pytest
import torch

from titans_pytorch.memory.scan import linear_scan, resolve_backend


def loop_scan(log_gates, tokens, initial):
    state, states = initial, []
    for j in range(log_gates.shape[1]):
        gate = log_gates[:, j].exp().reshape(-1, *([1] * (tokens.ndim - 2)))
        state = gate * state + tokens[:, j]
        states.append(state)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("length", [1, 5, 32])
def test_torch_scan_equals_loop(float64, length):
    log_gates = -torch.rand(3, length) * 2
    tokens = torch.randn(3, length, 4, 5)
    initial = torch.randn(3, 4, 5)
    torch.testing.assert_close(linear_scan(log_gates, tokens, initial, "torch"), loop_scan(log_gates, tokens, initial))


def test_backend_choice_and_errors():
    assert resolve_backend("auto", torch.device("cpu"), 7) == "torch"
    assert resolve_backend("auto", torch.device("cuda"), 64) == "warp"
    assert resolve_backend("auto", torch.device("cuda"), 48) == "scalar"
    with pytest.raises(ValueError, match="scan_backend"):
        resolve_backend("fast", torch.device("cpu"), 4)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend("scalar", torch.device("cpu"), 4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,length", [("scalar", 7), ("scalar", 64), ("warp", 64)])
def test_cuda_backends_equal_torch(backend, length):
    log_gates = (-torch.rand(3, length) * 0.5).cuda()
    tokens = torch.randn(3, length, 8, 4).cuda()
    initial = torch.randn(3, 8, 4).cuda()
    expected = linear_scan(log_gates, tokens, initial, "torch")
    torch.testing.assert_close(linear_scan(log_gates, tokens, initial, backend), expected, atol=1e-4, rtol=1e-4)
