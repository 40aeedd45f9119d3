"""The chunk loop of the built-in memory networks as one autograd function, its backward by hand.

`closed_form.py` computes a chunk's gradient sums with plain batched ops and lets autograd
differentiate through them; that costs about 140 dispatched ops per chunk, most of them in the
autograd formulas of the LayerNorm and GELU backward kernels (the outer backward of the inner
gradient is a second derivative). Here the loop runs without autograd and the backward is written
out, so a chunk costs about 60 ops forward and backward together, and everything of the backward
that the chunk-to-chunk recurrence does not need (the gradients of keys, residual offsets, token
weights and transitions) is computed after the reverse loop, batched over all chunks.

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

Returns the state before every chunk `(B, N, k, P)` (the reads are taken there, outside) and the
final state. `naive.py` is the reference, and the tests check these gradients against autograd
through `closed_form.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..memory_models import LAYER_NORM_EPS

_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)


def _gelu_backward(grad, z):
    return torch.ops.aten.gelu_backward(grad, z)


def _layer_norm_backward(grad, z, mean, rstd):
    dim = z.shape[-1]
    return torch.ops.aten.native_layer_norm_backward(grad, z, (dim,), mean, rstd, None, None, [True, False, False])[0]


def _row_dot(x, y):
    """`(x * y).sum(-1, keepdim=True)` for `(B, c, d)` tensors, as one batched matmul."""
    batch, rows, dim = x.shape
    return torch.bmm(x.reshape(batch * rows, 1, dim), y.reshape(batch * rows, dim, 1)).view(batch, rows, 1)


def _gelu_curvature(z):
    """`gelu''(z) * sqrt(2 pi) = exp(-z^2 / 2) (2 - z^2)` (the constant is applied by the caller)."""
    square = z * z
    return torch.exp(square * -0.5) * (2 - square)


def _by_rows(weighted, lam, transpose=False):
    """`sum_r weighted[:, :, r] @ lam[:, r]` (or `lam[:, r]^T`): weighted `(B, c, k, a)`, lam `(B, k, a', b')`."""
    out = None
    for row in range(weighted.shape[2]):
        matrix = lam[:, row].transpose(1, 2) if transpose else lam[:, row]
        out = torch.bmm(weighted[:, :, row], matrix) if out is None else torch.baddbmm(out, weighted[:, :, row], matrix)
    return out


class FusedChunkLoop(torch.autograd.Function):
    """`starts, final = FusedChunkLoop.apply(network, state, keys, offsets, token_weights, transitions)`.

    state `(B, k, P)`; keys, offsets `(B, N, c, d)`; token_weights `(B, N, c, k)` (scaled as in the
    module docstring); transitions `(B, N, k, k)`. Returns the state before each chunk
    `(B, N, k, P)` and after the last `(B, k, P)`.
    """

    @staticmethod
    def forward(ctx, network, state, keys, offsets, token_weights, transitions):
        layout, norm = network.layout, network.scale_name is not None
        weighted_keys = keys[..., None, :] * token_weights[..., None]  # (B, N, c, k, d)
        starts, saved = [], []
        for j in range(keys.shape[1]):
            starts.append(state)
            params = layout.views(state[:, 0])
            matrices = [params[name] for name in network.matrix_names]
            tw = token_weights[:, j]
            acts, pre, z = [keys[:, j]], [], None
            for m, matrix in enumerate(matrices):
                if m:
                    pre.append(z)
                    acts.append(F.gelu(z))
                z = torch.bmm(acts[-1], matrix)
            if norm:
                scale = params[network.scale_name][:, None]
                normed, mean, rstd = torch.native_layer_norm(z, (z.shape[-1],), None, None, LAYER_NORM_EPS)
                residual = torch.addcmul(offsets[:, j], normed, scale, value=z.shape[-1] ** -0.5)
                scaled = residual * scale
                deltas = [_layer_norm_backward(scaled, z, mean, rstd)]
                norm_saved = (z, normed, mean, rstd, residual, scaled)
            else:
                residual = z + offsets[:, j]
                deltas, norm_saved = [residual], None
            backs = []
            for m in range(len(matrices) - 1, 0, -1):
                backs.insert(0, torch.bmm(deltas[0], matrices[m].transpose(1, 2)))
                deltas.insert(0, _gelu_backward(backs[0], pre[m - 1]))
            weighted = [weighted_keys[:, j]] + [a[:, :, None, :] * tw[..., None] for a in acts[1:]]
            sums = {name: torch.bmm(w.flatten(2).transpose(1, 2), g).view(g.shape[0], tw.shape[-1], -1)
                    for name, w, g in zip(network.matrix_names, weighted, deltas)}
            if norm:
                sums[network.scale_name] = torch.bmm(tw.transpose(1, 2), residual * normed)
            state = torch.baddbmm(torch.cat([sums[name] for name in layout.names], dim=-1), transitions[:, j], state)
            saved.append((acts, pre, backs, deltas, weighted, norm_saved))
        starts = torch.stack(starts, dim=1)
        ctx.network, ctx.saved = network, saved
        ctx.save_for_backward(starts, keys, token_weights, transitions)
        return starts, state

    @staticmethod
    def backward(ctx, grad_starts, grad_final):
        network, saved = ctx.network, ctx.saved
        starts, keys, token_weights, transitions = ctx.saved_tensors
        layout, names = network.layout, network.matrix_names
        norm = network.scale_name is not None
        num_chunks = keys.shape[1]
        lam = grad_final  # adjoint of the state after chunk j
        lams, grad_residuals, grad_z0 = [None] * num_chunks, [None] * num_chunks, [None] * num_chunks
        for j in range(num_chunks - 1, -1, -1):
            acts, pre, backs, deltas, weighted, norm_saved = saved[j]
            lams[j] = lam
            params = layout.views(starts[:, j, 0])
            matrices = [params[name] for name in names]
            lam_params = layout.views(lam)
            lam_matrices = [lam_params[name] for name in names]
            tw = token_weights[:, j]
            last = len(matrices) - 1

            # gradients of the sums with respect to each delta, and to each hidden activation
            grad_deltas = [_by_rows(w, lm) for w, lm in zip(weighted, lam_matrices)]
            grad_acts = [None] + [
                _by_rows(deltas[m][:, :, None, :] * tw[..., None], lam_matrices[m], transpose=True)
                for m in range(1, len(matrices))
            ]
            # through delta_m = gelu'(z_m) * (delta_{m+1} W_{m+1}^T), bottom up
            grad_matrices, grad_z = [None] * len(matrices), [None] * len(matrices)
            for m in range(last):
                back_grad = _gelu_backward(grad_deltas[m], pre[m])
                grad_deltas[m + 1] = torch.baddbmm(grad_deltas[m + 1], back_grad, matrices[m + 1])
                grad_matrices[m + 1] = torch.bmm(back_grad.transpose(1, 2), deltas[m + 1])
            top = grad_deltas[last]
            if norm:
                z, normed, mean, rstd, residual, scaled = norm_saved
                scale = params[network.scale_name][:, None]
                inv_sqrt = z.shape[-1] ** -0.5
                grad_products = torch.bmm(tw, lam_params[network.scale_name])  # d/d(residual * normed)
                grad_scaled = _layer_norm_backward(top, z, mean, rstd)
                grad_residual = torch.addcmul(grad_scaled * scale, grad_products, normed)
                grad_scale = torch.addcmul(grad_scaled * residual, grad_residual, normed, value=inv_sqrt).sum(1)
                # the normed output's gradient: the forward path, the sums, and LN' depending on z
                dim = z.shape[-1]
                second = torch.addcmul(top * _row_dot(scaled, normed), scaled, _row_dot(top, normed))
                grad_normed = torch.addcmul(torch.addcmul(grad_products * residual, grad_residual, scale, value=inv_sqrt),
                                            second, rstd, value=-1 / dim)
                grad_z[last] = torch.addcmul(_layer_norm_backward(grad_normed, z, mean, rstd), normed,
                                             _row_dot(top, deltas[last]) * rstd, value=-1 / dim)
            else:
                grad_residual = grad_z[last] = top
            grad_residuals[j] = grad_residual
            # down the network: z_m = a_m W_m, a_m = gelu(z_{m-1})
            for m in range(last, -1, -1):
                if m < last:  # a_{m+1} = gelu(z_m), and delta_m = gelu'(z_m) * back_m
                    grad_z[m] = torch.addcmul(_gelu_backward(grad_acts[m + 1], pre[m]), grad_deltas[m] * backs[m],
                                              _gelu_curvature(pre[m]), value=_INV_SQRT_2PI)
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
            grad_weights = torch.cat([grads[name].flatten(1) for name in layout.names], dim=-1)
            lam = torch.bmm(transitions[:, j].transpose(1, 2), lam)
            lam[:, 0].add_(grad_weights)
            lam = lam + grad_starts[:, j]

        # what the recurrence does not need, for all chunks at once (batch and chunk flattened)
        batch, _, chunk, rows = token_weights.shape
        lams = torch.stack(lams, dim=1)  # adjoint of the state after each chunk
        grad_transitions = lams @ starts.transpose(-1, -2)
        flat = lambda t: t.flatten(0, 1)  # noqa: E731
        lam_params = {name: flat(t) for name, t in layout.views(lams).items()}
        weights = {name: flat(t) for name, t in layout.views(starts[:, :, 0]).items()}
        tw = flat(token_weights)

        def over_chunks(pick):
            return flat(torch.stack([pick(saved[j]) for j in range(num_chunks)], dim=1))

        grad_tw = 0
        for m, name in enumerate(names):
            inputs = flat(keys) if m == 0 else over_chunks(lambda chunk: chunk[0][m])
            deltas = over_chunks(lambda chunk: chunk[3][m])
            per_row = [_row_dot(torch.bmm(inputs, lam_params[name][:, row]), deltas) for row in range(rows)]
            grad_tw = grad_tw + torch.cat(per_row, dim=-1)
            if m == 0:
                deltas0 = deltas
        if norm:
            products = over_chunks(lambda chunk: chunk[5][4] * chunk[5][1])  # residual * normed
            grad_tw = grad_tw + torch.bmm(products, lam_params[network.scale_name].transpose(1, 2))
        first = names[0]
        grad_keys = _by_rows(deltas0[:, :, None, :] * tw[..., None], lam_params[first], transpose=True)
        grad_keys = torch.baddbmm(grad_keys, flat(torch.stack(grad_z0, dim=1)), weights[first].transpose(1, 2))
        return (None, lam, grad_keys.view(keys.shape), torch.stack(grad_residuals, dim=1),
                grad_tw.view(batch, -1, chunk, rows), grad_transitions)
