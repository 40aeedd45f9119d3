"""The memory update of Titans, chunk-parallel. `naive.py` beside this file is its reference.

Per token `t` (paper, section 3.1), with `u_t = grad_W ||M(k_t; W) - v_t||^2`:

    S_t = eta_t * S_{t-1} - theta_t * u_t        # momentum, "past surprise"
    W_t = (1 - alpha_t) * W_{t-1} + S_t          # forgetting, then the update

Chunked form: inside a chunk of `c` tokens every `u_i` is taken at the chunk's start
weights `W'` and tokens read `M(q; W')` ("retrieve, then store"). Unrolling the two
linear recurrences over the chunk (`E(a, b)` = prod eta, `A(a, b)` = prod (1 - alpha) over
tokens a+1..b):

    S_c = E(0,c) S' - sum_i theta_i E(i,c) u_i
    W_c = A(0,c) W' + [sum_t A(t,c) E(0,t)] S' - sum_i theta_i [sum_{t>=i} A(t,c) E(i,t)] u_i

so a chunk needs two *weighted sums* of per-token gradients, i.e. two vector-Jacobian
products of the per-token losses: no weight-sized tensor per token ever exists. The
weights are small `(c, c)` tensors built from cumulative sums of `log eta` and
`log (1 - alpha)`.

With `refresh_every = k > 1` the gradient point is refreshed only every `k` chunks;
inside such a span every chunk's sums are known at once and the chunk-to-chunk
recurrence over weight-sized states runs as two associative scans (`scan.py`).

All functions take per-(batch x head) fast weights as a dict of tensors `(BH, ...)` and a
`forward_fn(params, x)` that runs the memory network for one (batch, head) on `x (n, d)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vjp, vmap

from .scan import linear_scan


@dataclass
class ChunkCoefficients:
    """Scalars of one chunk's closed-form update, each `(..., )` or `(..., c)`."""

    grad_to_weights: torch.Tensor  # theta_i [sum_{t>=i} A(t,c) E(i,t)]  (..., c)
    log_weight_decay: torch.Tensor  # log A(0,c)                          (...)
    grad_to_momentum: torch.Tensor | None = None  # theta_i E(i,c)       (..., c)
    log_momentum_decay: torch.Tensor | None = None  # log E(0,c)         (...)
    momentum_to_weights: torch.Tensor | None = None  # sum_t A(t,c) E(0,t)  (...)


def chunk_coefficients(lr, log_momentum=None, log_retain=None) -> ChunkCoefficients:
    """lr `theta (..., c)`; log_momentum `log eta (..., c)` or None (no momentum);
    log_retain `log(1 - alpha) (..., c)` or None (no forgetting)."""
    retain = log_retain.cumsum(-1) if log_retain is not None else torch.zeros_like(lr)  # La_t
    retain_to_end = retain[..., -1:] - retain  # log A(t, c)
    if log_momentum is None:
        return ChunkCoefficients(grad_to_weights=lr * retain_to_end.exp(), log_weight_decay=retain[..., -1])

    mom = log_momentum.cumsum(-1)  # Le_t
    chunk = lr.shape[-1]
    # exponent[i, t] = log A(t, c) + log E(i, t), kept where t >= i
    exponent = retain_to_end[..., None, :] + mom[..., None, :] - mom[..., :, None]
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=lr.device).triu()
    pair = exponent.masked_fill(~upper, float("-inf")).exp()
    return ChunkCoefficients(
        grad_to_weights=lr * pair.sum(-1),
        log_weight_decay=retain[..., -1],
        grad_to_momentum=lr * (mom[..., -1:] - mom).exp(),
        log_momentum_decay=mom[..., -1],
        momentum_to_weights=(retain_to_end + mom).exp().sum(-1),
    )


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Per-token scale `min(1, max_norm / norm)`: never inflates, zero stays zero."""
    return (max_norm / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp(max=1.0)


def _token_losses(forward_fn, values):
    def losses(params, keys):
        return (forward_fn(params, keys) - values).square().sum(-1)

    return losses


def per_token_grad_norms(forward_fn, params, keys, values):
    """`||grad_W l(W; k_i, v_i)||` for each token of one chunk, `(c,)`."""

    def one(key, value):
        def loss(p):
            return (forward_fn(p, key[None]) - value[None]).square().sum()

        grads = torch.func.grad(loss)(params)
        return sum(g.square().sum() for g in grads.values())

    squared = vmap(one)(keys, values)
    return squared.clamp(min=torch.finfo(squared.dtype).tiny).sqrt()


def chunk_surprise(forward_fn, params, keys, values, cotangents, queries=None, max_grad_norm=None):
    """One (batch, head), one chunk, gradients at `params`.

    keys, values `(c, d)`; cotangents `(n, c)`: n sets of per-token weights; queries `(m, d)`
    or None. Returns the weighted gradient sums `{name: (n, ...)}` and, when queries are
    given, `M(queries; params)` from the same forward pass.
    """
    chunk = keys.shape[0]
    if max_grad_norm is not None:
        norms = per_token_grad_norms(forward_fn, params, keys, values)
        cotangents = cotangents * clip_factors(norms, max_grad_norm)

    inputs = keys if queries is None else torch.cat((keys, queries))

    def losses(p):
        out = forward_fn(p, inputs)
        return (out[:chunk] - values).square().sum(-1), out[chunk:]

    _, pullback, retrieved = vjp(losses, params, has_aux=True)
    (sums,) = vmap(pullback)(cotangents)
    return sums, retrieved


def _bcast(scalar, tensor):
    """Scalar per leading index `(B, ...)` shaped to broadcast against `tensor`."""
    return scalar.reshape(*scalar.shape, *((1,) * (tensor.ndim - scalar.ndim)))


def memory_span(
    forward_fn,
    weights,
    momentum,
    keys,
    values,
    lr,
    log_momentum=None,
    log_retain=None,
    queries=None,
    max_grad_norm=None,
    scan_backend="auto",
):
    """Advance the memory over `k` chunks that share one gradient point.

    weights / momentum: `{name: (BH, ...)}` (momentum None when off); keys, values, queries
    `(BH, k, c, d)`; lr, log_momentum, log_retain `(BH, k, c)`.
    Returns `(weights, momentum, retrieved)`: the state after the span and, when queries
    are given, `M(q; W)` for each chunk's queries at the weights before that chunk.
    """
    span = keys.shape[1]
    coeffs = chunk_coefficients(lr, log_momentum, log_retain)
    use_momentum = log_momentum is not None
    cot = [coeffs.grad_to_momentum, coeffs.grad_to_weights] if use_momentum else [coeffs.grad_to_weights]
    cot = torch.stack(cot, dim=2)  # (BH, k, n, c)

    def surprise(params, k, v, c, q=None):
        return chunk_surprise(forward_fn, params, k, v, c, q, max_grad_norm)

    if span == 1:
        # one chunk: its gradients and its read share one forward pass at the current weights
        fuse_read = queries is not None
        data = [t.squeeze(1) for t in (keys, values, cot, *((queries,) if fuse_read else ()))]
        sums, retrieved = vmap(surprise)(weights, *data)
        retrieved = retrieved[:, None] if fuse_read else None
        # unbind rather than indexing: its backward does not zero-fill weight-sized buffers
        new_weights, new_momentum = {}, {} if use_momentum else None
        for name, weight in weights.items():
            grad_sums = sums[name].unbind(1)  # n tensors (BH, ...)
            decayed = _bcast(coeffs.log_weight_decay.squeeze(1).exp(), weight) * weight
            if use_momentum:
                mom = momentum[name]
                new_momentum[name] = _bcast(coeffs.log_momentum_decay.squeeze(1).exp(), mom) * mom - grad_sums[0]
                decayed = decayed + _bcast(coeffs.momentum_to_weights.squeeze(1), mom) * mom
            new_weights[name] = decayed - grad_sums[-1]
        return new_weights, new_momentum, retrieved

    # a refresh span: every chunk's gradient sums at the span's first weights
    per_chunk = vmap(surprise, in_dims=(None, 0, 0, 0))
    sums, _ = vmap(per_chunk)(weights, keys, values, cot)
    # chain the per-chunk contributions with two scans over the span's chunks
    new_weights, new_momentum, chunk_start_weights = {}, {} if use_momentum else None, {}
    for name, weight in weights.items():
        grad_sums = sums[name]  # (BH, k, n, ...)
        weight_tokens = -grad_sums[:, :, -1]
        if use_momentum:
            mom = momentum[name]
            mom_states = linear_scan(coeffs.log_momentum_decay, -grad_sums[:, :, 0], mom, scan_backend)
            mom_before = torch.cat((mom[:, None], mom_states[:, :-1]), dim=1)
            weight_tokens = weight_tokens + _bcast(coeffs.momentum_to_weights, mom_before) * mom_before
            new_momentum[name] = mom_states[:, -1]
        weight_states = linear_scan(coeffs.log_weight_decay, weight_tokens, weight, scan_backend)
        new_weights[name] = weight_states[:, -1]
        chunk_start_weights[name] = torch.cat((weight[:, None], weight_states[:, :-1]), dim=1)

    retrieved = None
    if queries is not None:
        retrieved = vmap(vmap(forward_fn))(chunk_start_weights, queries)
    return new_weights, new_momentum, retrieved


def memory_chunks(
    forward_fn,
    weights,
    momentum,
    keys,
    values,
    lr,
    log_momentum=None,
    log_retain=None,
    queries=None,
    refresh_every=1,
    max_grad_norm=None,
    scan_backend="auto",
):
    """Run the memory over `N` whole chunks, one refresh span after another.

    keys, values, queries `(BH, N, c, d)`; lr, log_momentum, log_retain `(BH, N, c)`.
    Returns `(weights, momentum, retrieved (BH, N, c, d) or None)`.
    """
    num_chunks = keys.shape[1]
    outputs = []
    for start in range(0, num_chunks, refresh_every):
        span = slice(start, start + refresh_every)

        def part(t):
            return None if t is None else t[:, span]

        weights, momentum, retrieved = memory_span(
            forward_fn,
            weights,
            momentum,
            keys[:, span],
            values[:, span],
            lr[:, span],
            part(log_momentum),
            part(log_retain),
            part(queries),
            max_grad_norm,
            scan_backend,
        )
        outputs.append(retrieved)
    retrieved = torch.cat(outputs, dim=1) if queries is not None and outputs else None
    return weights, momentum, retrieved
