"""The chunk loop of the built-in memory networks in dual form: no weight-sized tensor per chunk.

`fused.py` writes the whole state `[W; S]` after every chunk (the next chunk's forward reads
it, the backward reads it again). But a chunk changes each matrix only by a sum of `c` outer
products, so the weights a chunk starts from are the call's first state plus token-weighted
outer products of everything seen since:

    W_{m,j} = sum_r beta_j[r] state_0[r]_m + sum_{t before chunk j} gamma_{j,t} a_{m,t}^T delta_{m,t}

with `beta_j = (T_{j-1} ... T_0)[0, :]` and, for token `t` of chunk `i < j`,
`gamma_{j,t} = sum_r (T_{j-1} ... T_{i+1})[0, r] w_{t,r}` (the transitions and token weights of
`fused.py`; its module docstring has the per-chunk math). Every product with `W_{m,j}` is then
a product with the fixed first state plus an attention-like term over the call's earlier tokens,

    a W_{m,j} = sum_r beta_j[r] (a state_0[r]_m) + ((a A_m^T) * gamma_j) Delta_m,
    delta W_{m,j}^T = sum_r beta_j[r] (delta state_0[r]_m^T) + ((delta Delta_m^T) * gamma_j) A_m,

and so are the reads: all chunks' queries go through the network at once after the loop. The
state is written once per block of chunks, not after every chunk. The attention-like terms grow
with the block, so long calls go in blocks (`dual_chunk_loop`'s `block_tokens`). `DualChunkLoop`
runs the chunks of a block with its backward written out; the final state and the reads are
batched expressions of its outputs, left to autograd. docs/memory-chunks.md has the derivation
and the measurements that choose between this and `fused.py` (`closed_form.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory_models import LAYER_NORM_EPS
from .fused import gelu_slope_and_back_curvature, layer_norm_backward


def transition_products(transitions):
    """`P[b, j, i] = T_{j-1} ... T_i` for `0 <= i <= j <= N` (identity at `i = j`, zero above),
    transitions `(B, N, k, k)` -> `(B, N+1, N+1, k, k)`."""
    batch, num_chunks, rows, _ = transitions.shape
    eye = torch.eye(rows, dtype=transitions.dtype, device=transitions.device).expand(batch, 1, rows, rows)
    products = [torch.cat((eye, transitions.new_zeros(batch, num_chunks, rows, rows)), dim=1)]
    for j in range(1, num_chunks + 1):
        reached = transitions[:, j - 1 : j] @ products[-1]  # T_{j-1} P_{j-1, i}, for every i
        products.append(torch.cat((reached[:, :j], eye, reached.new_zeros(batch, num_chunks - j, rows, rows)), dim=1))
    return torch.stack(products, dim=1)


def dual_coefficients(token_weights, transitions):
    """The mixing coefficients of the dual form.

    token_weights `(B, N, c, k)`, transitions `(B, N, k, k)` ->
    - `start (B, N+1, k, k)`: `P_{j,0}`, how state_0's rows make up chunk `j`'s state (`j = N`: the final one);
    - `gamma (B, N+1, k, N c)`: how token `t`'s gradient enters the state before chunk `j`, per row
      (zero for tokens of chunk `j` and after).
    """
    batch, num_chunks, chunk, rows = token_weights.shape
    products = transition_products(transitions)
    start = products[:, :, 0]
    # token t of chunk i enters after its chunk: P_{j, i+1} w_t, zero unless i < j
    after = products[:, :, 1:]  # (B, N+1, N, k, k): P_{j, i+1}
    gamma = torch.einsum("bjirs,bits->bjrit", after, token_weights).flatten(-2)
    return start, gamma


def _mix(products, coeffs):
    """`sum_r coeffs[r] products[r]`: products `(B, n, k d)` (the rows side by side), coeffs `(B, n|1, k)` -> `(B, n, d)`."""
    batch, tokens = products.shape[:2]
    rows = coeffs.shape[-1]
    coeffs = coeffs.expand(batch, tokens, rows)
    return torch.bmm(coeffs.reshape(batch * tokens, 1, rows), products.reshape(batch * tokens, rows, -1)).view(batch, tokens, -1)


def _spread(x, coeffs):
    """`[coeffs[0] x, ..., coeffs[k-1] x]`: x `(B, n, d)`, coeffs `(B, n|1, k)` -> `(B, n, k d)`."""
    return (x.unsqueeze(-2) * coeffs.unsqueeze(-1)).flatten(-2)


def stacked_rows(params, names):
    """Each matrix's rows of state_0 stacked, `(B, k d_in, d_out)`: one copy each (the rows lie a
    state apart), made once per block and shared by `DualChunkLoop` (forward and backward) and the reads."""
    return [params[name].flatten(1, 2) for name in names]


class _FirstState:
    """Products with state_0's rows mixed by per-token coefficients, for every matrix `m`:
    `times(x, m, coeffs) = sum_r coeffs[r] x W_m^(r)` (the rows stacked) and
    `times_t(y, m, coeffs) = sum_r coeffs[r] y W_m^(r)^T` (the transposed rows side by side, one
    copy of a matrix at its first use)."""

    def __init__(self, stacked):
        self.stacked = stacked  # (B, k d_in, d_out) each
        self._side_t = [None] * len(stacked)

    def side_t(self, m):  # (B, d_out, k d_in)
        if self._side_t[m] is None:
            self._side_t[m] = self.stacked[m].transpose(1, 2).contiguous()
        return self._side_t[m]

    def times(self, x, m, coeffs):
        return torch.bmm(_spread(x, coeffs), self.stacked[m])

    def times_t(self, y, m, coeffs):
        return _mix(torch.bmm(y, self.side_t(m)), coeffs)


def _past_term_backward(grad_out, x, past_keys, past_values, mask, grad_mask):
    """The backward of a chunk's term over the block's earlier tokens, `out = ((x K^T) * mask) V`:
    x `(B, c, a)`, K `(B, seen, a)`, V `(B, seen, b)`, mask `(B, 1, seen)` (gamma_j). Returns the
    gradients of x, K and V, and adds the mask's (summed over the chunk's rows) into `grad_mask (B, seen)`."""
    scores = torch.bmm(x, past_keys.transpose(1, 2))
    grad_scores = torch.bmm(grad_out, past_values.transpose(1, 2))
    grad_mask += (grad_scores * scores).sum(1)
    grad_values = torch.bmm((scores * mask).transpose(1, 2), grad_out)
    grad_scores.mul_(mask)
    return torch.bmm(grad_scores, past_keys), torch.bmm(grad_scores.transpose(1, 2), x), grad_values


class DualChunkLoop(torch.autograd.Function):
    """`(hidden..., deltas..., [scale_rows]) = DualChunkLoop.apply(network, chunk, keys, offsets, start, gamma, first_scale, *stacked)`.

    The sequential part of the dual form: every token's hidden activations `a_m` (`m >= 1`),
    deltas `delta_m` and, with the norm, `e * n`, each `(B, N c, .)`, token-major. keys, offsets
    `(B, N c, d)`; start `(B, N, k)` (beta_j) and gamma `(B, N, N c)` (gamma_j, zero from chunk j
    on), the weight row's coefficients of `dual_coefficients`; state_0 as its scale's rows
    `first_scale (B, k, d)` (None without the norm) and each matrix's rows, `stacked_rows`.
    """

    @staticmethod
    def forward(ctx, network, chunk, keys, offsets, start, gamma, first_scale, *stacked):
        names, scale_name = network.matrix_names, network.scale_name
        batch, tokens, dim = keys.shape
        depth, num_chunks = len(names), tokens // chunk
        first = _FirstState(stacked)
        token_start = start.repeat_interleave(chunk, dim=1)  # (B, N c, k)
        token_gamma = gamma.repeat_interleave(chunk, dim=1)  # (B, N c, N c): row u sees gamma of u's chunk
        widths = [first.stacked[m].shape[-1] for m in range(depth)]
        new = lambda width: keys.new_empty(batch, tokens, width)  # noqa: E731
        pre = [new(w) for w in widths[:-1]]  # z_m, the GELU inputs
        acts = [keys] + [new(w) for w in widths[:-1]]  # a_m, each matrix's input
        deltas = [new(w) for w in widths]
        backs = [None] + [new(w) for w in widths[:-1]]  # delta_m W_m^T, before the GELU slope
        # the first layer's inputs are all known: its product with state_0 and its key-key scores, once
        first_z = first.times(keys, 0, token_start)
        key_scores = torch.bmm(keys, keys.transpose(1, 2)).mul_(token_gamma)
        if scale_name is not None:
            scales = torch.bmm(start, first_scale)  # (B, N, d), completed chunk by chunk
            z_last, residuals, scaled, scale_rows = new(dim), new(dim), new(dim), new(dim)
            means, rstds = keys.new_empty(batch, tokens, 1), keys.new_empty(batch, tokens, 1)
        for j in range(num_chunks):
            seen, now = j * chunk, slice(j * chunk, (j + 1) * chunk)
            coeff = start[:, j : j + 1]  # (B, 1, k)
            mask = gamma[:, j : j + 1, :seen]  # (B, 1, seen)
            z = first_z[:, now]
            if seen:
                z = torch.baddbmm(z, key_scores[:, now, :seen], deltas[0][:, :seen])
            for m in range(1, depth):
                pre[m - 1][:, now] = z
                a = F.gelu(z)
                acts[m][:, now] = a
                z = first.times(a, m, coeff)
                if seen:
                    scores = torch.bmm(a, acts[m][:, :seen].transpose(1, 2)).mul_(mask)
                    z = torch.baddbmm(z, scores, deltas[m][:, :seen])
            offset = offsets[:, now]
            if scale_name is None:
                delta = z + offset  # M(k) - v
            else:
                z_last[:, now] = z
                if seen:
                    scales[:, j : j + 1] += torch.bmm(mask, scale_rows[:, :seen])
                scale = scales[:, j : j + 1]
                normed, mean, rstd = torch.native_layer_norm(z, (dim,), None, None, LAYER_NORM_EPS)
                residual = torch.addcmul(offset, normed, scale, value=dim**-0.5)
                residuals[:, now], means[:, now], rstds[:, now] = residual, mean, rstd
                scaled[:, now] = residual * scale
                scale_rows[:, now] = residual * normed
                delta = layer_norm_backward(scaled[:, now], z, mean, rstd)
            deltas[depth - 1][:, now] = delta
            for m in range(depth - 1, 0, -1):  # delta_{m-1} = gelu'(z_{m-1}) * (delta_m W_m^T)
                back = first.times_t(delta, m, coeff)
                if seen:
                    scores = torch.bmm(delta, deltas[m][:, :seen].transpose(1, 2)).mul_(mask)
                    back = torch.baddbmm(back, scores, acts[m][:, :seen])
                backs[m][:, now] = back
                delta = torch.ops.aten.gelu_backward(back, pre[m - 1][:, now])
                deltas[m - 1][:, now] = delta
        saved = [*stacked, keys, start, gamma, *pre, *acts[1:], *deltas, *backs[1:]]
        if scale_name is not None:
            saved += [first_scale, scales, z_last, residuals, scaled, scale_rows, means, rstds]
        ctx.save_for_backward(*saved)
        ctx.network, ctx.chunk = network, chunk
        return (*acts[1:], *deltas, *([scale_rows] if scale_name is not None else []))

    @staticmethod
    def backward(ctx, *grads):
        network, chunk = ctx.network, ctx.chunk
        names, scale_name = network.matrix_names, network.scale_name
        depth = len(names)
        saved = list(ctx.saved_tensors)
        stacked, (keys, start, gamma) = saved[:depth], saved[depth : depth + 3]
        pre = saved[depth + 3 : 2 * depth + 2]
        acts = [keys] + saved[2 * depth + 2 : 3 * depth + 1]
        deltas = saved[3 * depth + 1 : 4 * depth + 1]
        backs = [None] + saved[4 * depth + 1 : 5 * depth]
        if scale_name is not None:
            first_scale, scales, z_last, residuals, scaled, scale_rows, means, rstds = saved[5 * depth :]
        batch, tokens, dim = keys.shape
        num_chunks, rows = tokens // chunk, start.shape[-1]
        first = _FirstState(stacked)
        zeros = lambda t: torch.zeros_like(t)  # noqa: E731
        # the adjoints of the outputs, completed chunk by chunk from the last: a chunk's own once
        # every later chunk has added what it owes them
        grad_acts = [zeros(keys)] + [g.clone() if g is not None else zeros(a) for g, a in zip(grads[: depth - 1], acts[1:])]
        grad_deltas = [g.clone() if g is not None else zeros(d) for g, d in zip(grads[depth - 1 : 2 * depth - 1], deltas)]
        grad_z = [zeros(d) for d in deltas]  # each layer's output z_m
        grad_backs = [None] + [zeros(b) for b in backs[1:]]
        grad_gamma = zeros(gamma)
        grad_offsets = zeros(keys)
        if scale_name is not None:
            grad_rows = grads[-1].clone() if grads[-1] is not None else zeros(scale_rows)
            grad_scales = zeros(scales)
        # what depends on the forward pass alone, for all tokens at once: GELU's slopes gelu'(z_m) and
        # d delta_m / d z_m = back * gelu''(z_m)
        slopes, back_curvatures = [], []
        for m in range(1, depth):
            slope, back_curvature = gelu_slope_and_back_curvature(pre[m - 1], backs[m])
            slopes.append(slope)
            back_curvatures.append(back_curvature)
        for j in range(num_chunks - 1, -1, -1):
            seen, now = j * chunk, slice(j * chunk, (j + 1) * chunk)
            coeff = start[:, j : j + 1]  # (B, 1, k)
            mask = gamma[:, j : j + 1, :seen]
            # the backward chain, delta_{m-1} = gelu'(z_{m-1}) * back_m, bottom up
            for m in range(1, depth):
                grad_delta = grad_deltas[m - 1][:, now]
                grad_z[m - 1][:, now].addcmul_(grad_delta, back_curvatures[m - 1][:, now])
                grad_back = torch.mul(grad_delta, slopes[m - 1][:, now], out=grad_backs[m][:, now])
                delta = deltas[m][:, now]
                grad_deltas[m][:, now] += first.times(grad_back, m, coeff)
                if seen:  # back_m += ((delta_m Delta_m^T) * gamma_j) A_m
                    grad_delta, grad_past_deltas, grad_past_acts = _past_term_backward(
                        grad_back, delta, deltas[m][:, :seen], acts[m][:, :seen], mask, grad_gamma[:, j, :seen])
                    grad_deltas[m][:, now] += grad_delta
                    grad_deltas[m][:, :seen] += grad_past_deltas
                    grad_acts[m][:, :seen] += grad_past_acts
            top = grad_deltas[depth - 1][:, now]
            if scale_name is None:
                grad_offsets[:, now] = top
                grad_z[depth - 1][:, now] = top
            else:
                # (aten's CPU LayerNorm backward reads mean and rstd as if contiguous, whatever their strides)
                z, e, mean, rstd = z_last[:, now], residuals[:, now], means[:, now].contiguous(), rstds[:, now].contiguous()
                normed = (z - mean) * rstd
                scale = scales[:, j : j + 1]
                grad_products = grad_rows[:, now]  # d/d(e * n)
                grad_scaled = layer_norm_backward(top, z, mean, rstd)  # d/d(e * s)
                grad_residual = torch.addcmul(grad_scaled * scale, grad_products, normed)
                grad_offsets[:, now] = grad_residual
                grad_scale = torch.addcmul(grad_scaled * e, grad_residual, normed, value=dim**-0.5).sum(1, keepdim=True)
                grad_scales[:, j : j + 1] = grad_scale
                # through the LN backward's own dependence on n and rstd, then the forward norm
                factor = rstd * (-1 / dim)
                delta = deltas[depth - 1][:, now]
                grad_normed = top * ((scaled[:, now] * normed).sum(-1, keepdim=True) * factor)
                grad_normed = torch.addcmul(grad_normed, scaled[:, now] * factor, (top * normed).sum(-1, keepdim=True))
                grad_normed = torch.addcmul(torch.addcmul(grad_normed, grad_products, e), grad_residual, scale, value=dim**-0.5)
                grad_z[depth - 1][:, now] = torch.addcmul(layer_norm_backward(grad_normed, z, mean, rstd), normed,
                                                          (top * delta).sum(-1, keepdim=True) * rstd, value=-1 / dim)
                if seen:  # scale_j = start_j state_0 + gamma_j (e * n) of the chunks before
                    grad_gamma[:, j, :seen] += torch.bmm(scale_rows[:, :seen], grad_scale.transpose(1, 2))[..., 0]
                    grad_rows[:, :seen] += mask.transpose(1, 2) * grad_scale
            # the forward layers, top down: z_m = a_m (start_j state_0)_m + ((a_m A_m^T) * gamma_j) Delta_m
            for m in range(depth - 1, -1, -1):
                grad = grad_z[m][:, now]
                a = acts[m][:, now]
                grad_a = first.times_t(grad, m, coeff) if m else None  # the first layer's: batched below
                if seen:
                    from_past, grad_past_acts, grad_past_deltas = _past_term_backward(
                        grad, a, acts[m][:, :seen], deltas[m][:, :seen], mask, grad_gamma[:, j, :seen])
                    grad_a = from_past if grad_a is None else grad_a + from_past
                    grad_acts[m][:, :seen] += grad_past_acts
                    grad_deltas[m][:, :seen] += grad_past_deltas
                if m:
                    grad_a = grad_a + grad_acts[m][:, now]
                    grad_z[m - 1][:, now].addcmul_(grad_a, slopes[m - 1][:, now])
                elif grad_a is not None:
                    grad_acts[0][:, now] += grad_a

        # what the chunk-to-chunk chain does not need, for all tokens at once: the products with
        # state_0 (z_m = ... a_m (start state_0)_m, back_m = ... delta_m (start state_0)_m^T)
        token_start = start.repeat_interleave(chunk, dim=1)
        grad_keys = grad_acts[0] + first.times_t(grad_z[0], 0, token_start)
        grad_token_start = 0
        grad_stacked = []
        for m in range(depth):
            # z_m: d/dW^(r) = sum_t start_t[r] a_t^T zbar_t, d/dstart_t[r] = <zbar_t W^(r)^T, a_t>
            grad_first = torch.bmm(_spread(acts[m], token_start).transpose(1, 2), grad_z[m])  # (B, k d_in, d_out)
            products = torch.bmm(grad_z[m], first.side_t(m)).unflatten(-1, (rows, -1))
            grad_token_start = grad_token_start + (products * acts[m][:, :, None]).sum(-1)
            if m:  # back_m: d/dW^(r) = sum_t start_t[r] backbar_t^T delta_t, d/dstart_t[r] = <delta_t W^(r)^T, backbar_t>
                grad_first = torch.baddbmm(grad_first, _spread(grad_backs[m], token_start).transpose(1, 2), deltas[m])
                products = torch.bmm(deltas[m], first.side_t(m)).unflatten(-1, (rows, -1))
                grad_token_start = grad_token_start + (products * grad_backs[m][:, :, None]).sum(-1)
            grad_stacked.append(grad_first)
        grad_start = grad_token_start.view(batch, num_chunks, chunk, rows).sum(2)
        grad_first_scale = None
        if scale_name is not None:
            grad_first_scale = torch.bmm(start.transpose(1, 2), grad_scales)
            grad_start = grad_start + torch.bmm(grad_scales, first_scale.transpose(1, 2))
        return None, None, grad_keys, grad_offsets, grad_start, grad_gamma, grad_first_scale, *grad_stacked


def dual_chunk_loop(network, state, keys, offsets, token_weights, transitions, queries=None, block_tokens=None):
    """As `FusedChunkLoop` followed by the reads, in dual form (see the module docstring).

    state `(B, k, P)`; keys, offsets, queries `(B, N, c, d)`; token_weights `(B, N, c, k)` scaled
    as in `fused.py`; transitions `(B, N, k, k)`. Returns the state after the last chunk
    `(B, k, P)` and each chunk's queries read at the weights the chunk starts from `(B, N, c, d)`
    (or None). With `block_tokens`, the chunks go in blocks of that many tokens (at least one
    chunk), the state written after each: the attention-like terms stay within a block, so the
    cost stays linear in the length.
    """
    num_chunks, chunk = keys.shape[1:3]
    per_block = num_chunks if block_tokens is None else max(1, block_tokens // chunk)
    if per_block >= num_chunks:
        return _dual_block(network, state, keys, offsets, token_weights, transitions, queries)
    reads = []
    for begin in range(0, num_chunks, per_block):
        block = slice(begin, begin + per_block)
        state, read = _dual_block(network, state, keys[:, block], offsets[:, block], token_weights[:, block],
                                  transitions[:, block], None if queries is None else queries[:, block])
        reads.append(read)
    return state, None if queries is None else torch.cat(reads, dim=1)


def _dual_block(network, state, keys, offsets, token_weights, transitions, queries):
    names, scale_name, layout = network.matrix_names, network.scale_name, network.layout
    batch, num_chunks, chunk, dim = keys.shape
    depth, rows = len(names), state.shape[1]
    start, gamma = dual_coefficients(token_weights, transitions)
    params = layout.views(state)
    stacked = stacked_rows(params, names)
    outputs = DualChunkLoop.apply(network, chunk, keys.flatten(1, 2), offsets.flatten(1, 2), start[:, :-1, 0],
                                  gamma[:, :-1, 0], params[scale_name] if scale_name is not None else None, *stacked)
    acts = [keys.flatten(1, 2), *outputs[: depth - 1]]
    deltas = outputs[depth - 1 : 2 * depth - 1]
    scale_rows = outputs[-1] if scale_name is not None else None

    # the final state: state_0's rows mixed, plus every token's gradient with its rows' weights
    final_start, final_gamma = start[:, -1], gamma[:, -1]  # (B, k, k), (B, k, N c)
    parts = {}
    for m, name in enumerate(names):
        weighted = (acts[m][:, :, None, :] * final_gamma.transpose(1, 2)[..., None]).flatten(2)  # (B, N c, k d_m)
        sums = torch.bmm(weighted.transpose(1, 2), deltas[m]).view(batch, rows, -1)
        parts[name] = torch.baddbmm(sums, final_start, params[name].flatten(2))
    if scale_name is not None:
        parts[scale_name] = torch.baddbmm(torch.bmm(final_gamma, scale_rows), final_start, params[scale_name])
    final = torch.cat([parts[name] for name in layout.names], dim=-1)
    if queries is None:
        return final, None

    # the reads: every chunk's queries at its start weights, all chunks at once; query token u sees
    # the gradients of the chunks before its own, with its chunk's gamma
    query_start = start[:, :num_chunks, 0].repeat_interleave(chunk, dim=1)  # (B, N c, k)
    query_gamma = gamma[:, :num_chunks, 0].repeat_interleave(chunk, dim=1)  # (B, N c, N c)
    first = _FirstState(stacked)
    x = h = queries.flatten(1, 2)
    for m in range(depth):
        if m:
            h = F.gelu(h)
        scores = torch.bmm(h, acts[m].transpose(1, 2)) * query_gamma
        h = torch.baddbmm(first.times(h, m, query_start), scores, deltas[m])
    if scale_name is not None:
        scale = torch.baddbmm(torch.bmm(query_start, params[scale_name]), query_gamma, scale_rows)
        h = x + F.layer_norm(h, (dim,), eps=LAYER_NORM_EPS) * scale * dim**-0.5
    return final, h.view(batch, num_chunks, chunk, dim)
