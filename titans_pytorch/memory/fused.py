"""The chunk loop of the built-in memory networks as one autograd function, its backward by hand.

`closed_form.py` computes a chunk's gradient sums with plain batched ops and lets autograd
differentiate through them; that costs about 140 dispatched ops per chunk, most of them in the
autograd formulas of the LayerNorm and GELU backward kernels (the outer backward of the inner
gradient is a second derivative). Here the loop runs without autograd and the backward is written
out, so a chunk costs about 50 ops forward and backward together: everything of the backward that
depends on the forward pass alone (GELU slopes and curvatures) is computed before the reverse
loop, and everything the chunk-to-chunk recurrence does not need (the gradients of keys, residual
offsets, token weights and transitions) after it, each batched over all chunks. The states and
their adjoints live in one buffer each, written in place (no state-sized temporaries per chunk).

Forward, chunk `j` (state `[W; S] (B, k, P)`, `W` = matrices `W_m` and, for `ResidualNormMemory`, a
scale `s`), with keys `K (B, c, d)`, residual offsets `o`, token weights `w (B, c, k)` (the update
terms times 2, and times `1 / sqrt(d)` with a norm, so that the residual below needs no factors)
and transition `T (B, k, k)`:

    a_0 = K,  z_m = a_m W_m,  a_{m+1} = gelu(z_m)             # the network on the keys
    e = o + z_{L-1}                     (plain MLP: o = -V)    # residual M(k) - v
    e = o + LN(z_{L-1}) * s / sqrt(d)   (with norm: o = K - V)
    delta_{L-1} = e  or  LN'(e * s);  delta_m = gelu'(z_m) * (delta_{m+1} W_{m+1}^T)
    sums_m = (w * a_m)^T delta_m;  sums_s = w^T (e * LN(z))        # one row per state row
    state_{j+1} = T state_j + sums

Returns the weights `W` before every chunk, `(N, B, P)` (the reads are taken there, outside, in one
batched pass), and the final state. `naive.py` is the reference, and the tests check these
gradients against autograd through `closed_form.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)


def _layer_norm_backward(grad, z, mean, rstd):
    dim = z.shape[-1]
    return torch.ops.aten.native_layer_norm_backward(grad, z, (dim,), mean, rstd, None, None, [True, False, False])[0]


def _row_dot(x, y):
    """`(x * y).sum(-1, keepdim=True)` for `(B, c, d)` tensors, as one batched matmul."""
    batch, rows, dim = x.shape
    return torch.bmm(x.reshape(batch * rows, 1, dim), y.reshape(batch * rows, dim, 1)).view(batch, rows, 1)


def _by_rows(weighted_rows, matrices):
    """`sum_r weighted_rows[r] @ matrices[r]`, over the state's `k` rows: `(B, c, a)` and `(B, a, b)` each."""
    out = None
    for weighted, matrix in zip(weighted_rows, matrices):
        out = torch.bmm(weighted, matrix) if out is None else torch.baddbmm(out, weighted, matrix)
    return out


@dataclass
class _Chunk:
    """What the forward pass of one chunk keeps for the backward."""

    matrices: list  # its weight matrices W_m, views into the states buffer
    acts: list  # each matrix's input (a_0 = the keys)
    pre: list  # each GELU's input z_m
    backs: list  # delta_{m+1} W_{m+1}^T
    deltas: list  # the residual's gradient at each z_m
    weighted: list  # w * a_m, (B, c, k, d_in)
    norm: tuple | None  # (z, normed, mean, rstd, norm_scale, residual, residual * norm_scale)


class FusedChunkLoop(torch.autograd.Function):
    """`start_weights, final = FusedChunkLoop.apply(network, state, keys, offsets, token_weights, transitions)`.

    state `(B, k, P)`; keys, offsets `(B, N, c, d)`; token_weights `(B, N, c, k)` (scaled as in the
    module docstring); transitions `(B, N, k, k)`. Returns the weights each chunk starts from
    `(N, B, P)` and the state after the last chunk `(B, k, P)`.
    """

    @staticmethod
    def forward(ctx, network, state, keys, offsets, token_weights, transitions):
        ctx.set_materialize_grads(False)
        layout, norm, rows = network.layout, network.scale_name is not None, token_weights.shape[-1]
        num_chunks = keys.shape[1]
        # every chunk's state in one buffer, written in place: no state-sized temporaries per chunk
        # and no stacking afterwards (the states are kept for the backward anyway)
        states = state.new_empty(num_chunks + 1, *state.shape)
        states[0] = state
        # per-chunk views, made once for all chunks (unbind: one call each)
        weights = layout.views(states[:-1, :, 0])  # what each chunk reads at: {name: (N, B, *shape)}
        matrices = list(zip(*(weights[name].unbind(0) for name in network.matrix_names)))
        scales = weights[network.scale_name][:, :, None].unbind(0) if norm else [None] * num_chunks
        weighted_keys = keys[..., None, :] * token_weights[..., None]  # (B, N, c, k, d)
        inputs = zip(keys.unbind(1), offsets.unbind(1), token_weights.unbind(1), token_weights.transpose(2, 3).unbind(1),
                     weighted_keys.unbind(1), states.unbind(0), states[1:].unbind(0), transitions.unbind(1))
        chunks = []
        for j, (chunk_keys, chunk_offsets, tw, tw_rows, chunk_weighted_keys, state, next_state, transition) in enumerate(inputs):
            residual, saved = network.forward_views(matrices[j], scales[j], chunk_keys, offset=chunk_offsets)  # M(k) - v
            if norm:
                z, normed, mean, rstd, scale = saved.norm
                scaled = residual * scale
                deltas = [_layer_norm_backward(scaled, z, mean, rstd)]
                norm_saved = (*saved.norm, residual, scaled)
            else:
                deltas, norm_saved = [residual], None
            backs = []
            for m in range(len(saved.matrices) - 1, 0, -1):
                backs.insert(0, torch.bmm(deltas[0], saved.matrices[m].transpose(1, 2)))
                deltas.insert(0, torch.ops.aten.gelu_backward(backs[0], saved.hidden[m - 1]))
            weighted = [chunk_weighted_keys] + [a[:, :, None, :] * tw[..., None] for a in saved.inputs[1:]]
            sums = {name: torch.bmm(w.flatten(2).transpose(1, 2), g).view(g.shape[0], rows, -1)
                    for name, w, g in zip(network.matrix_names, weighted, deltas)}
            if norm:
                sums[network.scale_name] = torch.bmm(tw_rows, residual * normed)
            chunks.append(_Chunk(saved.matrices, saved.inputs, saved.hidden, backs, deltas, weighted, norm_saved))
            # state_{j+1} = T_j state_j + sums, in place in the buffer (contiguous writes: at small
            # sizes, matmuls into strided views cost several times more than this one copy)
            torch.cat([sums[name] for name in layout.names], dim=-1, out=next_state)
            next_state.baddbmm_(transition, state)
        ctx.network, ctx.chunks, ctx.states = network, chunks, states
        ctx.save_for_backward(keys, token_weights, transitions)
        # the final state is copied out: a view would keep every chunk's state alive with it (in a
        # decoding cache, say) long after this call's graph is gone
        return states[:-1, :, 0], states[-1].clone()

    @staticmethod
    def backward(ctx, grad_start_weights, grad_final):
        network, chunks = ctx.network, ctx.chunks
        keys, token_weights, transitions = ctx.saved_tensors
        layout, names = network.layout, network.matrix_names
        norm = network.scale_name is not None
        num_chunks, last = keys.shape[1], len(names) - 1
        dim = keys.shape[-1]
        inv_sqrt = dim**-0.5
        # lams[j]: the adjoint of the state after chunk j, all in one buffer written in place
        lams = ctx.states.new_empty(ctx.states[1:].shape)
        if grad_final is None:
            lams[-1].zero_()
        else:
            lams[-1] = grad_final
        grad_residuals, grad_z0 = [None] * num_chunks, [None] * num_chunks

        # what depends on the forward pass alone, for all chunks at once (chunk-major: (N, B, ...))
        def over_chunks(pick):
            return torch.stack([pick(chunk) for chunk in chunks])

        chunk_weights = token_weights.transpose(0, 1)  # (N, B, c, k)
        all_deltas = [over_chunks(lambda chunk: chunk.deltas[m]) for m in range(len(names))]
        weighted_deltas = [d[..., None, :] * chunk_weights[..., None] for d in all_deltas]  # (N, B, c, k, d_out)
        slopes, back_curvatures = [], []
        for m in range(last):
            z = over_chunks(lambda chunk: chunk.pre[m])
            slopes.append(torch.ops.aten.gelu_backward(torch.ones_like(z), z))  # gelu'(z_m)
            # d delta_m / d z_m = back_m * gelu''(z_m), gelu''(z) = exp(-z^2 / 2) (2 - z^2) / sqrt(2 pi)
            squared = z.square()
            curvature = torch.exp(squared * -0.5) * (2 - squared)
            back_curvatures.append(over_chunks(lambda chunk: chunk.backs[m]) * curvature * _INV_SQRT_2PI)
        if norm:  # <scaled, normed> per token
            scaled_normed = _row_dot(over_chunks(lambda chunk: chunk.norm[6]).flatten(0, 1),
                                     over_chunks(lambda chunk: chunk.norm[1]).flatten(0, 1)).unflatten(0, (num_chunks, -1))

        # per-chunk views, made once for all chunks (unbind: one call each)
        lam_list, lam_weights, lam_views = lams.unbind(0), lams[:, :, 0].unbind(0), layout.views(lams)
        lam_rows = {name: [t.unbind(0) for t in lam_views[name].unbind(2)] for name in names}
        lam_rows_t = {name: [t.transpose(-1, -2).unbind(0) for t in lam_views[name].unbind(2)] for name in names[1:]}
        lam_scales = lam_views[network.scale_name].unbind(0) if norm else None
        transposed_transitions = transitions.transpose(2, 3).unbind(1)
        chunk_tws = token_weights.unbind(1)
        start_grads = grad_start_weights.unbind(0) if grad_start_weights is not None else None
        slopes = [t.unbind(0) for t in slopes]
        back_curvatures = [t.unbind(0) for t in back_curvatures]
        weighted_delta_rows = [[t.unbind(2) for t in w.unbind(0)] for w in weighted_deltas]
        scaled_normed = scaled_normed.unbind(0) if norm else None

        for j in range(num_chunks - 1, -1, -1):
            chunk = chunks[j]
            acts, deltas, matrices = chunk.acts, chunk.deltas, chunk.matrices
            tw = chunk_tws[j]
            # gradients of the sums with respect to each delta, and to each hidden activation
            grad_deltas = [_by_rows(w.unbind(2), [rows[j] for rows in lam_rows[name]])
                           for w, name in zip(chunk.weighted, names)]
            grad_acts = [None] + [_by_rows(weighted_delta_rows[m][j], [rows[j] for rows in lam_rows_t[names[m]]])
                                  for m in range(1, len(matrices))]
            # through delta_m = gelu'(z_m) * (delta_{m+1} W_{m+1}^T), bottom up
            grad_matrices, grad_z = [None] * len(matrices), [None] * len(matrices)
            for m in range(last):
                back_grad = grad_deltas[m] * slopes[m][j]
                grad_deltas[m + 1] = torch.baddbmm(grad_deltas[m + 1], back_grad, matrices[m + 1])
                grad_matrices[m + 1] = torch.bmm(back_grad.transpose(1, 2), deltas[m + 1])
            top = grad_deltas[last]
            if norm:
                z, normed, mean, rstd, scale, residual, scaled = chunk.norm
                grad_products = torch.bmm(tw, lam_scales[j])  # d/d(residual * normed)
                grad_scaled = _layer_norm_backward(top, z, mean, rstd)
                grad_residual = torch.addcmul(grad_scaled * scale, grad_products, normed)
                grad_scale = torch.addcmul(grad_scaled * residual, grad_residual, normed, value=inv_sqrt).sum(1)
                # the normed output's gradient: the forward path, the sums, and LN' depending on z
                second = torch.addcmul(top * scaled_normed[j], scaled, _row_dot(top, normed))
                grad_normed = torch.addcmul(torch.addcmul(grad_products * residual, grad_residual, scale, value=inv_sqrt),
                                            second, rstd, value=-1 / dim)
                grad_z[last] = torch.addcmul(_layer_norm_backward(grad_normed, z, mean, rstd), normed,
                                             _row_dot(top, deltas[last]) * rstd, value=-1 / dim)
            else:
                grad_residual = grad_z[last] = top
            grad_residuals[j] = grad_residual
            # down the network: z_m = a_m W_m, a_{m+1} = gelu(z_m)
            for m in range(last, -1, -1):
                if m < last:  # and delta_m = gelu'(z_m) * back_m
                    grad_z[m] = torch.addcmul(grad_acts[m + 1] * slopes[m][j], grad_deltas[m], back_curvatures[m][j])
                if grad_matrices[m] is None:
                    grad_matrices[m] = torch.bmm(acts[m].transpose(1, 2), grad_z[m])
                else:
                    grad_matrices[m] = torch.baddbmm(grad_matrices[m], acts[m].transpose(1, 2), grad_z[m])
                if m:
                    grad_acts[m] = torch.baddbmm(grad_acts[m], grad_z[m], matrices[m].transpose(1, 2))
            grad_z0[j] = grad_z[0]
            grads = dict(zip(names, grad_matrices))
            if norm:
                grads[network.scale_name] = grad_scale
            # the adjoint before chunk j, T_j^T lam_j + the chunk's weight gradients (and the reads'),
            # into the buffer; before the first chunk, the state's gradient
            adjoint = torch.bmm(transposed_transitions[j], lam_list[j], out=lam_list[j - 1] if j else None)
            weights_row = lam_weights[j - 1] if j else adjoint[:, 0]
            weights_row.add_(torch.cat([grads[name].flatten(1) for name in layout.names], dim=-1))
            if start_grads is not None:
                weights_row.add_(start_grads[j])

        # what the recurrence does not need, for all chunks at once (chunk and batch flattened,
        # chunk-major as the buffers `states` and `lams` (N, B, k, P))
        batch, _, chunk_size, rows = token_weights.shape
        flat = lambda t: t.flatten(0, 1)  # noqa: E731
        states = ctx.states[:-1]
        grad_transitions = torch.bmm(flat(lams), flat(states).transpose(1, 2)).view(num_chunks, batch, rows, rows)
        lam_params = {name: flat(t) for name, t in lam_views.items()}
        first_weights = flat(layout.views(states[:, :, 0])[names[0]])
        grad_tw = 0
        for m, name in enumerate(names):
            inputs = flat(keys.transpose(0, 1) if m == 0 else over_chunks(lambda chunk: chunk.acts[m]))
            deltas = flat(all_deltas[m])
            per_row = [_row_dot(torch.bmm(inputs, lam_params[name][:, row]), deltas) for row in range(rows)]
            grad_tw = grad_tw + torch.cat(per_row, dim=-1)
        if norm:
            products = flat(over_chunks(lambda chunk: chunk.norm[5] * chunk.norm[1]))  # residual * normed
            grad_tw = grad_tw + torch.bmm(products, lam_params[network.scale_name].transpose(1, 2))
        grad_keys = _by_rows(flat(weighted_deltas[0]).unbind(2),
                             [t.transpose(1, 2) for t in lam_params[names[0]].unbind(1)])
        grad_keys = torch.baddbmm(grad_keys, flat(torch.stack(grad_z0)), first_weights.transpose(1, 2))
        return (None, adjoint, grad_keys.view(num_chunks, batch, *keys.shape[2:]).transpose(0, 1),
                torch.stack(grad_residuals, dim=1), grad_tw.view(num_chunks, batch, chunk_size, rows).transpose(0, 1),
                grad_transitions.transpose(0, 1))
