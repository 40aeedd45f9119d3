"""First-order linear recurrences `x_j = g_j * x_{j-1} + b_j` with a scalar gate per row.

Used across the chunks of a refresh span (`NeuralMemory(refresh_every=k)`), where each
chunk's contribution is known up front and only the weight-sized states remain to be
chained. Backends:

- `"torch"`: exact, any device. The recurrence unrolled in log space,
  `x_j = exp(L_j) x_0 + sum_{m<=j} exp(L_j - L_m) b_m` with `L = cumsum(log g)`: one small
  triangular matrix times the tokens.
- `"scalar"`: `accelerated_scan.scalar` (Triton, CUDA, any length).
- `"warp"`: `accelerated_scan.warp` (CUDA C++, length a power of two in 32..65536). Its kernels
  are compiled the first time it is used, which takes over a minute: it is never chosen by
  `"auto"`, only on request.
- `"auto"`: `scalar` on CUDA, else `torch`.

Both accelerated scans run one program per sequence; each weight entry is a sequence, laid
out along the launch grid's first axis (up to 2^31 - 1 programs), so weights of any size fit.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "torch", "scalar", "warp")


def _warp_length_ok(length: int) -> bool:
    return 32 <= length <= 65536 and (length & (length - 1)) == 0


def resolve_backend(backend: str, device: torch.device, length: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"scan_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "scalar" if device.type == "cuda" else "torch"
    if backend in ("scalar", "warp") and device.type != "cuda":
        raise ValueError(f"scan_backend={backend!r} needs CUDA tensors, got device {device}")
    if backend == "warp" and not _warp_length_ok(length):
        raise ValueError(f"scan_backend='warp' needs a length that is a power of two in 32..65536, got {length}")
    return backend


def linear_scan_torch(log_gates: torch.Tensor, tokens: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """log_gates `(B, T)`, tokens `(B, T, *P)`, initial `(B, *P)` -> states `(B, T, *P)`."""
    length = log_gates.shape[1]
    cumulative = log_gates.cumsum(1)
    exponent = cumulative[:, :, None] - cumulative[:, None, :]  # (B, j, m): log prod_{m<i<=j} g_i
    causal = torch.ones(length, length, dtype=torch.bool, device=log_gates.device).tril()
    transfer = exponent.masked_fill(~causal, float("-inf")).exp()
    flat_tokens = tokens.flatten(2)
    states = transfer @ flat_tokens + cumulative.exp()[..., None] * initial.flatten(1)[:, None]
    return states.view_as(tokens)


def _linear_scan_accelerated(log_gates, tokens, initial, backend):
    if backend == "warp":
        from accelerated_scan.warp import scan  # compiles its CUDA kernels on first use (over a minute)
    else:
        from accelerated_scan.scalar import scan
    batch, length = log_gates.shape
    gates = log_gates.exp()
    flat = tokens.flatten(2).clone()
    flat[:, 0] = flat[:, 0] + gates[:, :1] * initial.flatten(1)
    channels = flat.shape[-1]
    # one sequence per (row, channel), all along the grid's first axis: (batch * channels, 1, length)
    gates = gates[:, None, :].expand(batch, channels, length).reshape(batch * channels, 1, length)
    states = scan(gates, flat.transpose(1, 2).reshape(batch * channels, 1, length))
    return states.view(batch, channels, length).transpose(1, 2).reshape_as(tokens)


def linear_scan(log_gates, tokens, initial, backend: str = "auto"):
    """`x_j = exp(log_gates_j) * x_{j-1} + tokens_j`, `x_0 = initial`; returns `x_1..x_T`."""
    backend = resolve_backend(backend, tokens.device, log_gates.shape[1])
    if backend == "torch":
        return linear_scan_torch(log_gates, tokens, initial)
    return _linear_scan_accelerated(log_gates, tokens, initial, backend)
