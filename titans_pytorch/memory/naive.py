"""Reference: the memory recurrence as a plain loop, one (batch, head) and one token at a time.

Slow and obvious on purpose; every chunked path (`chunking.run_chunks` with the fused, closed-form
and `torch.func` networks) must agree with it.

    for every token t (chunk size c, gradient point refreshed every `refresh_every` chunks):
        y_t = M(q_t; W at the start of t's chunk)            # retrieve, then store
        u_t = grad_W ||M(k_t; W at the last refresh) - v_t||^2  (optionally norm-clipped)
        S_t = eta_t * S_{t-1} - theta_t * u_t                # S_t = -theta_t u_t without momentum
        W_t = (1 - alpha_t) * W_{t-1} + S_t
"""

from __future__ import annotations

import torch


def memory_reference(
    forward_fn,
    weights,
    momentum,
    keys,
    values,
    queries,
    lr,
    log_momentum=None,
    log_retain=None,
    chunk_size=1,
    refresh_every=1,
    max_grad_norm=None,
):
    """weights/momentum `{name: (BH, ...)}`; keys, values, queries `(BH, T, d)`; gates `(BH, T)`.

    Returns `(weights, momentum, retrieved (BH, T, d))`.
    """
    heads, length = keys.shape[:2]
    out_weights = {name: [] for name in weights}
    out_momentum = {name: [] for name in weights} if momentum is not None else None
    retrieved = torch.zeros_like(queries)
    for bh in range(heads):
        weight = {name: w[bh] for name, w in weights.items()}
        mom = {name: m[bh] for name, m in momentum.items()} if momentum is not None else None
        grad_point = read_point = weight
        for t in range(length):
            if t % (chunk_size * refresh_every) == 0:
                grad_point = weight
            if t % chunk_size == 0:
                read_point = weight
            retrieved[bh, t] = forward_fn(read_point, queries[bh, t][None])[0]

            def loss(params, key=keys[bh, t], value=values[bh, t]):
                return (forward_fn(params, key[None])[0] - value).square().sum()

            grad = torch.func.grad(loss)(grad_point)
            if max_grad_norm is not None:
                norm = torch.sqrt(sum(g.square().sum() for g in grad.values()))
                if norm > max_grad_norm:
                    grad = {name: g * (max_grad_norm / norm) for name, g in grad.items()}

            keep = log_retain[bh, t].exp() if log_retain is not None else 1.0
            if mom is not None:
                eta = log_momentum[bh, t].exp()
                mom = {name: eta * mom[name] - lr[bh, t] * grad[name] for name in grad}
                surprise = mom
            else:
                surprise = {name: -lr[bh, t] * grad[name] for name in grad}
            weight = {name: keep * weight[name] + surprise[name] for name in grad}

        for name in weights:
            out_weights[name].append(weight[name])
            if mom is not None:
                out_momentum[name].append(mom[name])
    stack = lambda d: {name: torch.stack(v) for name, v in d.items()}  # noqa: E731
    return stack(out_weights), (stack(out_momentum) if out_momentum is not None else None), retrieved
