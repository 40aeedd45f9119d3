"""What a chunk's update needs that does not depend on the fast weights, computed once per call.

Per token `t` (paper, section 3.1), with `u_t = grad_W ||M(k_t; W) - v_t||^2`:

    S_t = eta_t * S_{t-1} - theta_t * u_t        # momentum, "past surprise"
    W_t = (1 - alpha_t) * W_{t-1} + S_t          # forgetting, then the update

Inside a chunk of `c` tokens every `u_i` is taken at the chunk's start weights `W'`. Unrolling
the two linear recurrences over the chunk (`E(a, b)` = prod eta, `A(a, b)` = prod (1 - alpha)
over tokens a+1..b):

    S_c = E(0,c) S' - sum_i theta_i E(i,c) u_i
    W_c = A(0,c) W' + [sum_t A(t,c) E(0,t)] S' - sum_i theta_i [sum_{t>=i} A(t,c) E(i,t)] u_i

so a chunk needs two *weighted sums* of per-token gradients (no weight-sized tensor per token)
and a 2 x 2 transition of the state `[W; S]`. The weights come from cumulative sums of `log eta`
and `log (1 - alpha)` and one reverse log-cumsum-exp (never a division by a cumulative product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
    # sum_{t>=i} A(t,c) E(i,t) = exp(-Le_i) sum_{t>=i} exp(log A(t,c) + Le_t): a reverse log-cumsum-exp,
    # so no (c, c) tensor and no division by a cumulative product (the exponent below is <= log c)
    to_end = torch.logcumsumexp((retain_to_end + mom).flip(-1), dim=-1).flip(-1)  # log sum_{t>=i} A(t,c) E(0,t)
    return ChunkCoefficients(
        grad_to_weights=lr * (to_end - mom).exp(),
        log_weight_decay=retain[..., -1],
        grad_to_momentum=lr * (mom[..., -1:] - mom).exp(),
        log_momentum_decay=mom[..., -1],
        momentum_to_weights=to_end[..., 0].exp(),
    )


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Per-token scale `min(1, max_norm / norm)`: never inflates, zero stays zero."""
    return (max_norm / norms.clamp(min=torch.finfo(norms.dtype).tiny)).clamp(max=1.0)


@dataclass
class UpdateTerms:
    """A call's update terms for `N` chunks of `c` tokens, `B` = batch x heads. The state is
    `[W; S]` stacked, `(B, k, P)`, with `k = 2` rows with momentum and `k = 1` without.

    - `token_weights (B, N, c, k)`: per row, the weight of token `i`'s gradient `u_i` in the
      row's update: `-theta_i [sum_{t>=i} A(t,c) E(i,t)]` for `W`, `-theta_i E(i,c)` for `S`;
    - `transitions (B, N, k, k)`: `[[A(0,c), sum_t A(t,c) E(0,t)], [0, E(0,c)]]`, so that
      `state_j = transitions_j @ state_{j-1} + token-weighted gradient sums`;
    - `coefficients`: the same terms as scalars, for the scans of a refresh span.
    """

    token_weights: torch.Tensor
    transitions: torch.Tensor
    coefficients: ChunkCoefficients

    @property
    def rows(self) -> int:
        return self.token_weights.shape[-1]


def update_terms(lr, log_momentum=None, log_retain=None) -> UpdateTerms:
    """Gates `(B, N, c)` (log_momentum / log_retain None when off) -> `UpdateTerms`."""
    coeffs = chunk_coefficients(lr, log_momentum, log_retain)
    weight_decay = coeffs.log_weight_decay.exp()
    if log_momentum is None:
        token_weights = -coeffs.grad_to_weights[..., None]
        transitions = weight_decay[..., None, None]
    else:
        token_weights = -torch.stack((coeffs.grad_to_weights, coeffs.grad_to_momentum), dim=-1)
        zero = torch.zeros_like(weight_decay)
        transitions = torch.stack(
            (weight_decay, coeffs.momentum_to_weights, zero, coeffs.log_momentum_decay.exp()), dim=-1
        ).unflatten(-1, (2, 2))
    return UpdateTerms(token_weights, transitions, coeffs)


def chain_span(state, grad_sums, coeffs: ChunkCoefficients, scan_backend):
    """Chain the chunks of a refresh span whose gradient sums are all known.

    state `(B, k, P)` before the span; grad_sums `(B, r, k, P)`, the token-weighted sums of the
    span's `r` chunks (all at the span's first weights); coeffs `(B, r)` scalars. Returns the state
    after each chunk, `(B, r, k, P)`, by two first-order scans (momentum, then weights).
    """
    weights, weight_tokens = state[:, 0], grad_sums[:, :, 0]
    if state.shape[1] == 2:
        momentum = state[:, 1]
        momentum_states = linear_scan(coeffs.log_momentum_decay, grad_sums[:, :, 1], momentum, scan_backend)
        momentum_before = torch.cat((momentum[:, None], momentum_states[:, :-1]), dim=1)
        weight_tokens = weight_tokens + coeffs.momentum_to_weights[..., None] * momentum_before
    weight_states = linear_scan(coeffs.log_weight_decay, weight_tokens, weights, scan_backend)
    if state.shape[1] == 2:
        return torch.stack((weight_states, momentum_states), dim=2)
    return weight_states[:, :, None]


def _span(coeffs: ChunkCoefficients, span: slice) -> ChunkCoefficients:
    return ChunkCoefficients(**{name: None if t is None else t[:, span] for name, t in vars(coeffs).items()})


def sequential_states(network, state, keys, values, terms: UpdateTerms, max_grad_norm=None):
    """The weights before each of `N` chunks `(N, B, P)` and the state after the last `(B, k, P)`,
    one chunk after another through `network.grad_sums` (autograd differentiates the loop)."""
    starts = []
    # unbind once, not a slice per chunk: the backward stacks each input's gradients once
    chunks = zip(keys.unbind(1), values.unbind(1), terms.token_weights.unbind(1), terms.transitions.unbind(1))
    for chunk_keys, chunk_values, token_weights, transition in chunks:
        starts.append(state[:, 0])
        sums = network.grad_sums(state[:, 0], chunk_keys[:, None], chunk_values[:, None], token_weights[:, None],
                                 max_grad_norm)
        state = torch.baddbmm(sums[:, 0], transition, state)
    return torch.stack(starts), state


def span_states(network, state, keys, values, terms: UpdateTerms, refresh_every, max_grad_norm=None,
                scan_backend="auto"):
    """As `sequential_states` (weights before each chunk `(N, B, P)`, final state), with the gradients of `refresh_every` chunks at a time taken at the
    span's first weights and the span's chunks chained by scans."""
    starts = []
    for start in range(0, keys.shape[1], refresh_every):
        span = slice(start, start + refresh_every)
        sums = network.grad_sums(state[:, 0], keys[:, span], values[:, span], terms.token_weights[:, span],
                                 max_grad_norm)
        states = chain_span(state, sums, _span(terms.coefficients, span), scan_backend)
        starts.append(torch.cat((state[None, :, 0], states[:, :-1, 0].transpose(0, 1))))
        state = states[:, -1]
    return torch.cat(starts), state


def run_chunks(network, state, keys, values, terms: UpdateTerms, queries=None, refresh_every=1, max_grad_norm=None,
               scan_backend="auto"):
    """Advance the memory over `N` whole chunks, reading each chunk's queries at the weights
    the chunk starts from (retrieve, then store).

    network: `closed_form.ClosedFormNetwork` or `functional.TorchFuncNetwork` (their `chunk_loop`
    runs the default case, no refresh spans and no clipping); state `[W; S]`
    `(B, k, P)`; keys, values, queries `(B, N, c, d)`; terms for the `N` chunks. With
    `refresh_every = r > 1`, `r` chunks share one gradient point and are chained by scans.
    Returns `(state, reads (B, N, c, d) or None)`.
    """
    if refresh_every > 1:
        starts, state = span_states(network, state, keys, values, terms, refresh_every, max_grad_norm, scan_backend)
    elif max_grad_norm is None:
        return network.chunk_loop(state, keys, values, terms, queries)
    else:
        starts, state = sequential_states(network, state, keys, values, terms, max_grad_norm)
    return state, read_at_starts(network, starts, queries)


def read_at_starts(network, starts, queries):
    """Every chunk's queries `(B, N, c, d)` read at its start weights `starts (N, B, P)`, in one
    batched read -> `(B, N, c, d)`; None without queries."""
    if queries is None:
        return None
    reads = network.read(starts.flatten(0, 1), queries.transpose(0, 1).flatten(0, 1))
    return reads.view(queries.shape[1], queries.shape[0], *queries.shape[2:]).transpose(0, 1)
