"""Per-token gradient sums for any memory network, through `torch.func`.

The generic path: a custom memory module (any token-wise `nn.Module` without buffers) is run
per (batch, head) with `functional_call` under `vmap`, and a chunk's token-weighted gradient sums
are vector-Jacobian products of its per-token losses (one `vjp`, pulled back once per row of the
state). `closed_form.py` computes the same sums for the built-in networks with plain batched
matmuls; `naive.py` is the reference both are tested against.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vjp, vmap

from .chunking import clip_factors, read_at_starts, sequential_states
from .layout import FlatLayout


def per_token_grad_norms(forward_fn, params, keys, values):
    """`||grad_W l(W; k_i, v_i)||` for each token of one chunk, `(c,)`."""

    def one(key, value):
        def loss(p):
            return (forward_fn(p, key[None]) - value[None]).square().sum()

        grads = grad(loss)(params)
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


class TorchFuncNetwork:
    """Any memory network, per (batch, head) through `torch.func`. Weights are flat, `(B, P)`."""

    def __init__(self, model):
        self.model = model
        self.layout = FlatLayout.of(model)

    def _forward(self, params, x):
        return functional_call(self.model, params, (x,))

    def read(self, weights, x):
        """x `(B, n, d)` read at weights `(B, P)` -> `(B, n, d)`."""
        return vmap(self._forward)(self.layout.views(weights), x)

    def chunk_states(self, state, keys, values, terms):
        return sequential_states(self, state, keys, values, terms)

    def chunk_loop(self, state, keys, values, terms, queries=None):
        """As `ClosedFormNetwork.chunk_loop`: one chunk after another, then the reads."""
        starts, state = self.chunk_states(state, keys, values, terms)
        return state, read_at_starts(self, starts, queries)

    def grad_sums(self, weights, keys, values, token_weights, max_grad_norm=None):
        """As `ClosedFormNetwork.grad_sums`: keys, values `(B, r, c, d)`, token_weights
        `(B, r, c, k)` -> sums `(B, r, k, P)`."""
        params = self.layout.views(weights)
        cotangents = token_weights.transpose(-1, -2)  # (B, r, k, c): k sets of per-token weights

        def one_chunk(p, k, v, cot):
            return chunk_surprise(self._forward, p, k, v, cot, max_grad_norm=max_grad_norm)[0]

        sums = vmap(vmap(one_chunk, in_dims=(None, 0, 0, 0)))(params, keys, values, cotangents)
        return self.layout.flatten(sums, leading=3)
