import os
import subprocess
import sys

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
    # warp compiles for over a minute on first use: only on request
    assert resolve_backend("auto", torch.device("cuda"), 64) == "scalar"
    assert resolve_backend("auto", torch.device("cuda"), 48) == "scalar"
    assert resolve_backend("warp", torch.device("cuda"), 64) == "warp"
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


@pytest.mark.cuda
def test_scalar_scan_at_the_seed_configs_weight_size():
    # 2 x 589,824 weight entries (the seed example's memory): more sequences than a grid's second axis holds
    log_gates = (-torch.rand(2, 4) * 0.5).cuda()
    tokens = torch.randn(2, 4, 589_824).cuda()
    initial = torch.randn(2, 589_824).cuda()
    expected = linear_scan(log_gates, tokens, initial, "torch")
    torch.testing.assert_close(linear_scan(log_gates, tokens, initial, "scalar"), expected, atol=1e-4, rtol=1e-4)


INTERPRETED = """
import torch
from titans_pytorch.memory.scan import _linear_scan_accelerated, linear_scan_torch
torch.manual_seed(0)
log_gates, tokens, initial = -torch.rand(3, 5) * 0.5, torch.randn(3, 5, 6, 2), torch.randn(3, 6, 2)
out = _linear_scan_accelerated(log_gates, tokens, initial, "scalar")
torch.testing.assert_close(out, linear_scan_torch(log_gates, tokens, initial), atol=1e-5, rtol=1e-5)
print("ok")
"""


def test_scalar_scan_layout_under_the_triton_interpreter():
    # accelerated_scan.scalar's Triton kernels on CPU tensors (TRITON_INTERPRET=1, set before Triton loads)
    pytest.importorskip("triton")
    numpy = pytest.importorskip("numpy")
    if tuple(int(part) for part in numpy.__version__.split(".")[:2]) >= (2, 4):
        # its loops run to a bound known only at run time, which the Triton 3.6 interpreter reads
        # with int() of a one-element array: an error from numpy 2.4 on (checked with 2.3.5: passes)
        pytest.skip("the Triton interpreter's run-time loop bounds need numpy < 2.4")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
