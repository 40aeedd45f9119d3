"""The chunk loop of the built-in memory networks as one autograd function, its backward by hand.

`closed_form.py` computes a chunk's gradient sums with plain batched ops and lets autograd
differentiate through them; that costs about 140 dispatched ops per chunk, most of them in the
autograd formulas of the LayerNorm and GELU backward kernels (the outer backward of the inner
gradient is a second derivative). Here the loop runs without autograd and the backward is written
out, so a chunk of the default network costs 45 ops forward and backward together (16 and 29).
Everything that does not depend on a chunk's weights is done once per call, batched over all
chunks: before the forward loop the per-chunk views and the token-weighted keys; before the reverse
loop whatever depends on the forward pass alone (GELU slopes and curvatures, the token-weighted
deltas, the norm's per-token factors); after it everything the chunk-to-chunk recurrence does not
need (the gradients of keys, residual offsets, token weights and transitions). The states and
their adjoints live in one buffer each, written in place (no state-sized temporaries per chunk);
what the forward saves per chunk is written into buffers of one allocation. Sums are accumulated
in place into the temporaries that hold them (`baddbmm_`): on CUDA an out-of-place `baddbmm`
copies its input first, a kernel more.

Forward, chunk `j` (state `[W; S] (B, k, P)`, `W` = matrices `W_m` and, for `ResidualNormMemory`, a
scale `s`), with keys `K (B, c, d)`, residual offsets `o`, token weights `w (B, c, k)` (the update
terms times 2, and times `1 / sqrt(d)` with a norm, so that the residual below needs no factors)
and transition `T (B, k, k)`:

    a_0 = K,  z_m = a_m W_m,  a_{m+1} = gelu(z_m)             # the network on the keys
    e = o + z_{L-1}                     (plain MLP: o = -V)    # residual M(k) - v
    e = o + n * s / sqrt(d), n = LN(z_{L-1})  (with norm: o = K - V)
    delta_{L-1} = e  or  LN'(e * s);  delta_m = gelu'(z_m) * (delta_{m+1} W_{m+1}^T)
    sums_m = (w * a_m)^T delta_m;  sums_s = w^T (e * n)           # one row per state row
    state_{j+1} = T state_j + sums

Returns the weights `W` before every chunk, `(N, B, P)` (the reads are taken there, outside, in one
batched pass), and the final state. `naive.py` is the reference, and the tests check these
gradients against autograd through `closed_form.py`.

With the norm, 16 of a chunk's 45 ops are the norm's elementwise and row-wise steps (from `LN(z)`
to the delta, and their gradients: 5 and 11). On a GPU every op is a kernel of a few microseconds
whatever its size, so there they run as one Triton kernel each way (`residual_norm_triton.py`,
chosen in `_residual_norm`): 31 kernels a chunk.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..memory_models import LAYER_NORM_EPS

_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)
# below this many elements a oneDNN GELU (torch's CPU default for float32) costs more to set up,
# about 10 us a call, than aten's own kernel takes for the whole tensor
_ONEDNN_MIN_ELEMENTS = 1 << 15
_gelu = torch._C._nn.gelu  # (x, out=None)
_gelu_backward = torch.ops.aten.gelu_backward.default
_gelu_backward_into = torch.ops.aten.gelu_backward.grad_input  # (grad, z, out)
_layer_norm_backward_op = torch.ops.aten.native_layer_norm_backward.default
_NO_AFFINE = [True, False, False]


def layer_norm_backward(grad, z, mean, rstd):
    """aten's LayerNorm backward without affine parameters: `grad` through `LN(z)` (mean and rstd of z)."""
    return _layer_norm_backward_op(grad, z, (z.shape[-1],), mean, rstd, None, None, _NO_AFFINE)[0]


def gelu_slope_and_back_curvature(z, back):
    """For `delta = gelu'(z) * back`: `gelu'(z)`, and `d delta / d z = back * gelu''(z)` with
    `gelu''(z) = exp(-z^2 / 2) (2 - z^2) / sqrt(2 pi)` (all elementwise)."""
    squared = z.square()
    curvature = torch.exp(squared * -0.5).mul_((2 - squared) * _INV_SQRT_2PI)
    return _gelu_backward(torch.ones_like(z), z), curvature.mul_(back)


def _widths(network):
    """Each matrix's output width, in `matrix_names` order."""
    layout = network.layout
    return [layout.shapes[layout.names.index(name)][-1] for name in network.matrix_names]


@contextmanager
def _small_gelu_kernels(network, keys):
    """On a CPU, aten's own GELU kernels while a chunk's hidden activations (keys `(B, N, c, d)`)
    are small (oneDNN's setup would dominate them). oneDNN's switch is process-wide; it is restored
    on exit, and what runs meanwhile only picks other kernels for the same results. Under
    `torch.compile` nothing is switched (the compiler picks its own kernels)."""
    elements = keys.shape[0] * keys.shape[2] * _widths(network)[0]
    if (torch.compiler.is_compiling() or keys.device.type != "cpu" or elements >= _ONEDNN_MIN_ELEMENTS
            or not torch.backends.mkldnn.enabled):
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


_backward_pass = threading.local()  # the adjoint buffers of the backward pass running in this thread


def _adjoint_buffer(states):
    """An uninitialised buffer shaped like `states`, for the backward's adjoints.

    On a CPU, one buffer per shape serves every fused loop of a backward pass (memory as context
    runs one per segment and memory layer) and is released when the pass ends: a fresh buffer of
    this size (tens of MB) comes straight from the kernel and page-faults in on every call, which
    costs more than the loop's arithmetic. Elsewhere (CUDA's caching allocator reuses memory
    already), under `torch.compile` and outside the autograd engine, a plain allocation."""
    if states.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty_like(states)
    task = torch._C._current_graph_task_id()  # the backward pass, -1 outside the engine
    if task < 0:
        return torch.empty_like(states)
    if getattr(_backward_pass, "task", None) != task:  # this pass's first loop (a failed pass leaves its own)
        torch.autograd.Variable._execution_engine.queue_callback(_end_backward_pass)  # run when the pass ends
        _backward_pass.task, _backward_pass.buffers = task, {}
    key = (tuple(states.shape), states.dtype)
    if key not in _backward_pass.buffers:
        _backward_pass.buffers[key] = torch.empty_like(states)
    return _backward_pass.buffers[key]


def _end_backward_pass():
    _backward_pass.task = _backward_pass.buffers = None


def _buffers(like, shapes):
    """Uninitialised tensors of `shapes`, each contiguous, carved out of one allocation like `like`."""
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(like.new_empty(sum(sizes)).split(sizes), shapes)]


def _row_dot(x, y, add_to=None):
    """`(x * y).sum(-1)` for `(B, c, d)` tensors as one batched matmul, `(B c, 1, 1)`, added to `add_to` in place."""
    batch, rows, dim = x.shape
    x, y = x.reshape(batch * rows, 1, dim), y.reshape(batch * rows, dim, 1)
    return torch.bmm(x, y) if add_to is None else add_to.baddbmm_(x, y)


def _by_rows(weighted_rows, matrices):
    """`sum_r weighted_rows[r] @ matrices[r]`, over the state's `k` rows: `(B, c, a)` and `(B, a, b)` each.
    (Accumulated in place: on CUDA an out-of-place `baddbmm` copies its input first, a kernel more.)"""
    out = torch.bmm(weighted_rows[0], matrices[0])
    for weighted, matrix in zip(weighted_rows[1:], matrices[1:]):
        out.baddbmm_(weighted, matrix)
    return out


def _part_order(network):
    """For each parameter in layout order, its index among (matrices..., scale)."""
    parts = (*network.matrix_names, network.scale_name)
    return [parts.index(name) for name in network.layout.names]


def _rows(views, transpose=False):
    """`{name: (N, B, k, *shape)}` -> per name, `[chunk][row]` views `(B, *shape)` (transposed matrices with `transpose`)."""
    out = {}
    for name, view in views.items():
        if transpose:
            view = view.transpose(-1, -2)
        out[name] = list(zip(*(t.unbind(0) for t in view.unbind(2))))
    return out


class AtenResidualNorm:
    """The residual norm of `ResidualNormMemory` for one chunk, in aten ops (the reference for
    `residual_norm_triton.py`). Forward: z, offset `(B, c, d)`, scale `(B, 1, d)` -> normed, mean and
    rstd `(B, c, 1)`, delta = LN'(e s) and the sums' e * n, with e = offset + n s / sqrt(d) written
    into `residual` and e s into `scaled`. Backward: made once per call from every chunk's saved
    values `(N, B, c, .)` and scales `(N, B, d)`, then `backward(j, top, grad_products)` per chunk
    (the gradients of its delta and e * n) -> z's and the scale's (summed over the chunk, `(B, d)`);
    after the last chunk, `residual_grads()` -> every chunk's residual gradient `(N, B, c, d)`.

    The residual's gradient `grad_scaled * s + grad_products * n` is not needed inside the loop: it
    enters the scale's and n's gradients only through `grad_scaled` and `grad_products`, with factors
    fixed by the forward (`A = e + n s / sqrt(d)`, `n^2 / sqrt(d)`, `s^2 / sqrt(d)`, made once per
    call), so a chunk costs 11 ops and the residuals' gradients are batched at the end (4 ops a call)."""

    @staticmethod
    def forward(z, offset, scale, residual, scaled):
        dim = z.shape[-1]
        normed, mean, rstd = torch.native_layer_norm(z, (dim,), None, None, LAYER_NORM_EPS)
        torch.addcmul(offset, normed, scale, value=dim**-0.5, out=residual)  # M(k) - v
        torch.mul(residual, scale, out=scaled)
        return normed, mean, rstd, layer_norm_backward(scaled, z, mean, rstd), residual * normed

    def __init__(self, z_last, normed, mean, rstd, residual, scaled, delta, scales):
        num_chunks, _, chunk, dim = z_last.shape
        root = dim**-0.5
        # per token: <e s, n> and rstd fold into two factors; <grad, n> and <grad, rstd delta>
        # come out of one batched matmul with [n, rstd delta] stacked
        factor = rstd * (-1 / dim)
        self.normed_scaled = (scaled * normed).sum(-1, keepdim=True).mul_(factor).unbind(0)  # -(rstd / d) <e s, n>
        self.scaled_rstd = (scaled * factor).unbind(0)  # -(rstd / d) e s
        self.dot_with = torch.stack((normed, rstd * delta), dim=-1).flatten(1, 2).unbind(0)  # (B c, d, 2)
        self.chunks = list(zip(*(t.unbind(0) for t in (z_last, normed, mean, rstd))))
        # the residual's gradient folded into the factors of grad_scaled and grad_products (no
        # broadcasting in the loop: the scale per chunk spread over the chunk's tokens)
        token_scales = scales.unsqueeze(2)  # (N, B, 1, d)
        self.residual_factor = torch.addcmul(residual, normed, token_scales, value=root).unbind(0)  # A = e + n s / sqrt(d)
        self.products_factor = (normed * (normed * root)).unbind(0)  # n^2 / sqrt(d)
        self.scaled_factor = (token_scales.square() * root).expand(-1, -1, chunk, -1).contiguous().unbind(0)  # s^2 / sqrt(d)
        self.normed, self.scales = normed, token_scales
        self.saved = [None] * num_chunks  # each chunk's (grad_scaled, grad_products)

    def backward(self, j, top, grad_products):
        z, n, mu, rs = self.chunks[j]  # z_{L-1}, LN(z), its mean and rstd
        batch, chunk, dim = z.shape
        grad_scaled = layer_norm_backward(top, z, mu, rs)  # d/d(e * s)
        self.saved[j] = grad_scaled, grad_products
        # the scale's: sum over tokens of grad_scaled * e + grad_residual * n / sqrt(d)
        grad_scale = torch.addcmul(grad_scaled * self.residual_factor[j], grad_products, self.products_factor[j]).sum(1)
        dots = torch.bmm(top.view(-1, 1, dim), self.dot_with[j]).view(batch, chunk, 2)  # <top, n>, <top, rstd delta>
        # the normed output's gradient: the sums, the residual, and LN' depending on z
        grad_normed = torch.addcmul(top * self.normed_scaled[j], self.scaled_rstd[j], dots[..., :1])
        grad_normed = torch.addcmul(torch.addcmul(grad_normed, grad_products, self.residual_factor[j]),
                                    grad_scaled, self.scaled_factor[j])
        grad_z = torch.addcmul(layer_norm_backward(grad_normed, z, mu, rs), n, dots[..., 1:], value=-1 / dim)
        return grad_z, grad_scale

    def residual_grads(self):
        grad_scaled, grad_products = (torch.stack(t) for t in zip(*self.saved))
        return torch.addcmul(grad_scaled * self.scales, grad_products, self.normed)


class TritonResidualNorm:
    """`AtenResidualNorm` as one Triton kernel each way (`residual_norm_triton.py`), same interface."""

    @staticmethod
    def forward(z, offset, scale, residual, scaled):
        from .residual_norm_triton import residual_norm_forward
        return residual_norm_forward(z, offset, scale, LAYER_NORM_EPS, residual, scaled)

    def __init__(self, z_last, normed, mean, rstd, residual, scaled, delta, scales):
        from .residual_norm_triton import residual_norm_backward
        self.kernel = residual_norm_backward
        self.chunks = list(zip(*(t.unbind(0) for t in (normed, rstd, residual, delta, scales.unsqueeze(2)))))
        self.residuals = [None] * len(self.chunks)

    def backward(self, j, top, grad_products):
        normed, rstd, residual, delta, scale = self.chunks[j]
        self.residuals[j], grad_z, grad_scale = self.kernel(top, grad_products, normed, rstd, residual, delta, scale)
        return grad_z, grad_scale

    def residual_grads(self):
        return torch.stack(self.residuals)


# Where the residual norm's kernels are chosen: "auto" runs the Triton kernels on CUDA (each aten op
# there is a GPU kernel of its own, a few microseconds whatever its size: 16 of a chunk's 45) and the
# aten ops elsewhere and under torch.compile; "aten" everywhere (bench_memory.py times both on CUDA);
# "triton" everywhere (the tests, on CPU tensors under the Triton interpreter).
NORM_KERNELS = "auto"


@functools.cache
def _triton_available():
    """Triton importable, and a C compiler for the launcher it builds at the first launch."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return any(map(shutil.which, (os.environ.get("CC") or "cc", "gcc", "clang")))


def _residual_norm(keys):
    """The residual norm's implementation for a loop over `keys`: `TritonResidualNorm` or `AtenResidualNorm`."""
    if NORM_KERNELS == "triton":
        return TritonResidualNorm
    on_gpu = NORM_KERNELS == "auto" and keys.device.type == "cuda" and not torch.compiler.is_compiling()
    return TritonResidualNorm if on_gpu and _triton_available() else AtenResidualNorm


class FusedChunkLoop(torch.autograd.Function):
    """`start_weights, final = FusedChunkLoop.apply(network, state, keys, offsets, token_weights, transitions)`.

    state `(B, k, P)`; keys, offsets `(B, N, c, d)`; token_weights `(B, N, c, k)` (scaled as in the
    module docstring); transitions `(B, N, k, k)`. Returns the weights each chunk starts from
    `(N, B, P)` and the state after the last chunk `(B, k, P)`.
    """

    @staticmethod
    def forward(ctx, network, state, keys, offsets, token_weights, transitions):
        ctx.set_materialize_grads(False)
        names, scale_name, layout = network.matrix_names, network.scale_name, network.layout
        batch, num_chunks, chunk_size, dim = keys.shape
        depth, rows = len(names), token_weights.shape[-1]
        residual_norm = _residual_norm(keys)
        with _small_gelu_kernels(network, keys):
            # every chunk's state in one buffer, written in place: no state-sized temporaries per
            # chunk and no stacking afterwards (the states are kept for the backward anyway)
            states = state.new_empty(num_chunks + 1, *state.shape)
            states[0] = state
            # per-chunk views, made once for all chunks (unbind: one call each), chunk-major
            weights = layout.views(states[:-1, :, 0])  # what each chunk reads at: {name: (N, B, *shape)}
            matrices = [weights[name].unbind(0) for name in names]
            transposed = [None] + [weights[name].transpose(-1, -2).unbind(0) for name in names[1:]]
            chunk_keys = keys.transpose(0, 1).unbind(0)
            chunk_offsets = offsets.transpose(0, 1).unbind(0)
            chunk_weights = token_weights.transpose(0, 1)  # (N, B, c, k)
            weights_by_token = chunk_weights.unsqueeze(-1).unbind(0)  # (B, c, k, 1)
            # (w * K)^T, for the first matrix's sums: (B, k d, c)
            weighted_keys = keys.transpose(0, 1).unsqueeze(3) * chunk_weights.unsqueeze(-1)  # (N, B, c, k, d)
            weighted_keys_t = weighted_keys.flatten(3).transpose(2, 3).unbind(0)
            if scale_name is not None:
                scales = weights[scale_name].unsqueeze(2).unbind(0)  # (B, 1, d), filled in as the loop goes
                weights_by_row = chunk_weights.transpose(2, 3).unbind(0)  # (B, k, c)
            order = _part_order(network)
            parts = [None] * len(order)
            next_states, prev_states = states[1:].unbind(0), states[:-1].unbind(0)
            chunk_transitions = transitions.transpose(0, 1).unbind(0)

            # saved for the backward, chunk-major buffers written in place (no stacking in the
            # backward): GELU inputs z_m and outputs a_{m+1}, the token-weighted a_{m+1} (N, B, c, k, d_m),
            # delta_m W_m^T, deltas, z_{L-1}, and with the norm e and e * s; lists for the rest (the norm's n, mean, rstd)
            widths = _widths(network)
            hidden = widths[:-1]
            lead = (num_chunks, batch, chunk_size)
            shapes = [(*lead, w) for w in hidden] * 4 + [(*lead, rows, w) for w in hidden] + [(*lead, dim)] * (
                1 if scale_name is None else 3)
            buffers = _buffers(keys, shapes)  # one allocation for all of them
            count = len(hidden)
            pre, backs, deltas, acts, weighted_acts = (buffers[i * count : (i + 1) * count] for i in range(5))
            z_last = buffers[5 * count]
            pre_chunks, back_chunks, delta_chunks, act_chunks, weighted_chunks = (
                [t.unbind(0) for t in b] for b in (pre, backs, deltas, acts, weighted_acts))
            acts_by_token = [a.unsqueeze(3).unbind(0) for a in acts]  # (B, c, 1, d_m)
            weighted_t = [w.flatten(3).transpose(2, 3).unbind(0) for w in weighted_acts]  # (B, k d_m, c)
            z_last_chunks = z_last.unbind(0)
            if scale_name is None:
                norm = None
            else:
                residuals, scaled_residuals = buffers[5 * count + 1 :]
                residual_chunks, scaled_chunks = residuals.unbind(0), scaled_residuals.unbind(0)
                norm = [[], [], []]  # n, mean, rstd
                last_deltas = []
            for j in range(num_chunks):
                # the network on the keys, as `ClosedFormNetwork.forward`, into the buffers
                h = chunk_keys[j]
                for m in range(depth):
                    if m:
                        h = _gelu(h, out=act_chunks[m - 1][j])
                    h = torch.bmm(h, matrices[m][j], out=pre_chunks[m][j] if m < depth - 1 else z_last_chunks[j])
                if scale_name is None:
                    residual = delta = h.add_(chunk_offsets[j])  # M(k) - v, in place of z_{L-1}
                else:  # residual M(k) - v and scaled into their buffers
                    normed, mean, rstd, delta, scale_rows = residual_norm.forward(
                        h, chunk_offsets[j], scales[j], residual_chunks[j], scaled_chunks[j])
                    for saved, t in zip(norm, (normed, mean, rstd)):
                        saved.append(t)
                    last_deltas.append(delta)
                for m in range(depth - 1, 0, -1):  # delta_{m-1} = gelu'(z_{m-1}) * (delta_m W_m^T)
                    back = torch.bmm(delta, transposed[m][j], out=back_chunks[m - 1][j])
                    delta = _gelu_backward_into(back, pre_chunks[m - 1][j], grad_input=delta_chunks[m - 1][j])
                # the token-weighted gradient sums, one row of the state per row of w
                parts[0] = torch.bmm(weighted_keys_t[j], delta).view(batch, rows, -1)
                for m in range(1, depth):
                    torch.mul(acts_by_token[m - 1][j], weights_by_token[j], out=weighted_chunks[m - 1][j])  # (B, c, k, d_m)
                    layer_delta = delta_chunks[m][j] if m < depth - 1 else (residual if scale_name is None else last_deltas[j])
                    parts[m] = torch.bmm(weighted_t[m - 1][j], layer_delta).view(batch, rows, -1)
                if scale_name is not None:
                    parts[depth] = torch.bmm(weights_by_row[j], scale_rows)
                # state_{j+1} = T_j state_j + sums, in place in the buffer (contiguous writes: at small
                # sizes, matmuls into strided views cost several times more than this one copy)
                torch.cat([parts[i] for i in order], dim=-1, out=next_states[j])
                next_states[j].baddbmm_(chunk_transitions[j], prev_states[j])
            # the last matrix's deltas: the residual itself without the norm (stacked in the backward)
            deltas.append(z_last if scale_name is None else last_deltas)
            if scale_name is not None:
                norm = (z_last, *norm, residuals, scaled_residuals)
        # all through save_for_backward (a flat list of tensors), so that autograd frees them after the
        # backward pass unless the graph is retained: a graph kept alive afterwards (say, by the
        # previous step's loss while the next step runs) must not hold every chunk's state
        saved, ctx.saved_structure = tree_flatten((states, keys, token_weights, transitions, weighted_keys, pre, acts,
                                                   backs, deltas, weighted_acts, norm))
        ctx.save_for_backward(*saved)
        ctx.network = network
        # the final state is copied out: a view would keep every chunk's state alive with it (in a
        # decoding cache, say) long after this call's graph is gone
        return states[:-1, :, 0], states[-1].clone()

    @staticmethod
    def backward(ctx, grad_start_weights, grad_final):
        network = ctx.network
        (states, keys, token_weights, transitions, weighted_keys, pre, acts, backs, deltas, weighted_acts,
         norm) = tree_unflatten(list(ctx.saved_tensors), ctx.saved_structure)
        names, scale_name, layout = network.matrix_names, network.scale_name, network.layout
        batch, num_chunks, chunk_size, dim = keys.shape
        depth, rows, last = len(names), token_weights.shape[-1], len(names) - 1
        residual_norm = _residual_norm(keys)
        with _small_gelu_kernels(network, keys):
            # lams[j]: the adjoint of states[j], all in one buffer; the last is the final state's
            # gradient, each earlier one written by its chunk below: its weights' row whole, the
            # other rows (momentum) added to from zero; nothing returned is a view of it
            lams = _adjoint_buffer(states)
            if grad_final is None:
                lams[-1].zero_()
            else:
                lams[-1] = grad_final
            if rows > 1:
                lams[:-1, :, 1:].zero_()
            read_grads = grad_start_weights.unbind(0) if grad_start_weights is not None else None

            weights = layout.views(states[:-1, :, 0])  # what each chunk read at, {name: (N, B, *shape)}
            lam_views = layout.views(lams[1:])  # the adjoint after each chunk, {name: (N, B, k, *shape)}

            # what depends on the forward pass alone, for all chunks at once (chunk-major: (N, B, ...))
            chunk_weights = token_weights.transpose(0, 1)  # (N, B, c, k)
            # (contiguous: a product broadcasting them over the last dimension of strided weights is several times slower)
            row_weights = chunk_weights.permute(3, 0, 1, 2).unsqueeze(-1).contiguous()  # (k, N, B, c, 1)
            stacked = lambda t: t if torch.is_tensor(t) else torch.stack(t)  # noqa: E731  (buffers, or lists of chunks)
            all_deltas = [stacked(d) for d in deltas]
            delta_chunks = [d.unbind(0) for d in all_deltas]
            # w_r * delta_m for the hidden activations' gradients, row-major so that every row is
            # contiguous: (k, N, B, c, d_out)
            weighted_deltas = [None] + [d * row_weights for d in all_deltas[1:]]
            slopes, back_curvatures = [], []
            for m in range(last):
                slope, back_curvature = gelu_slope_and_back_curvature(pre[m], backs[m])
                slopes.append(slope.unbind(0))
                back_curvatures.append(back_curvature.unbind(0))
            if scale_name is not None:
                z_last, normed, mean, rstd, residual, scaled = (stacked(t) for t in norm)
                norm_backward = residual_norm(z_last, normed, mean, rstd, residual, scaled, all_deltas[last],
                                              weights[scale_name])
                lam_scales = lam_views[scale_name].unbind(0)  # (B, k, d)
                chunk_tws = chunk_weights.unbind(0)

            # per-chunk views, made once for all chunks (unbind: one call each)
            matrices = [weights[name].unbind(0) for name in names]
            transposed = [weights[name].transpose(-1, -2).unbind(0) for name in names]
            lam_rows = _rows({name: lam_views[name] for name in names})
            lam_rows_t = _rows({name: lam_views[name] for name in names[1:]}, transpose=True)
            weighted_key_rows = list(zip(*(t.unbind(0) for t in weighted_keys.unbind(3))))
            weighted_act_rows = [list(zip(*(t.unbind(0) for t in w.unbind(3)))) for w in weighted_acts]
            act_chunks = [a.unbind(0) for a in acts]
            weighted_delta_rows = [None] + [list(zip(*(t.unbind(0) for t in w.unbind(0)))) for w in weighted_deltas[1:]]
            key_chunks = keys.transpose(0, 1).unbind(0)
            lam_list, lam_weights = lams[:-1].unbind(0), lams[:-1, :, 0].unbind(0)
            next_lams = lams[1:].unbind(0)
            transposed_transitions = transitions.transpose(0, 1).transpose(2, 3).unbind(0)
            order = _part_order(network)
            grad_residuals = [None] * num_chunks
            if depth > 1:  # the first layer's output gradient, written into a buffer by the op that computes it
                grad_z0 = keys.new_empty(num_chunks, batch, chunk_size, _widths(network)[0])
                grad_z0_chunks = grad_z0.unbind(0)
            else:
                grad_z0 = [None] * num_chunks

            for j in range(num_chunks - 1, -1, -1):
                grads = [None] * len(order)  # the chunk's weight gradients, in `names` order, then the scale
                # gradients of the sums with respect to each delta, and to each hidden activation
                grad_deltas = [_by_rows(weighted_key_rows[j], lam_rows[names[0]][j])]
                grad_deltas += [_by_rows(weighted_act_rows[m - 1][j], lam_rows[names[m]][j]) for m in range(1, depth)]
                grad_acts = [None] + [_by_rows(weighted_delta_rows[m][j], lam_rows_t[names[m]][j])
                                      for m in range(1, depth)]
                # through delta_m = gelu'(z_m) * (delta_{m+1} W_{m+1}^T), bottom up
                for m in range(last):
                    back_grad = grad_deltas[m] * slopes[m][j]
                    grad_deltas[m + 1].baddbmm_(back_grad, matrices[m + 1][j])
                    grads[m + 1] = torch.bmm(back_grad.transpose(1, 2), delta_chunks[m + 1][j])
                top = grad_deltas[last]
                if scale_name is None:
                    grad_residuals[j] = grad_z = top
                else:
                    grad_products = torch.bmm(chunk_tws[j], lam_scales[j])  # d/d(e * n)
                    grad_z, grads[depth] = norm_backward.backward(j, top, grad_products)
                # down the network: z_m = a_m W_m, a_{m+1} = gelu(z_m)
                for m in range(last, -1, -1):
                    if m < last:  # and delta_m = gelu'(z_m) * back_m
                        grad_z = torch.addcmul(grad_acts[m + 1] * slopes[m][j], grad_deltas[m], back_curvatures[m][j],
                                               out=None if m else grad_z0_chunks[j])
                    inputs = act_chunks[m - 1][j] if m else key_chunks[j]
                    if grads[m] is None:
                        grads[m] = torch.bmm(inputs.transpose(1, 2), grad_z)
                    else:
                        grads[m].baddbmm_(inputs.transpose(1, 2), grad_z)
                    if m:
                        grad_acts[m].baddbmm_(grad_z, transposed[m][j])
                if depth == 1:
                    grad_z0[j] = grad_z
                # the adjoint before chunk j: the chunk's weight gradients and the gradient of what
                # was read at its start weights, as its weights' row, plus T_j^T lam_{j+1}
                torch.cat([grads[i].flatten(1) for i in order], dim=-1, out=lam_weights[j])
                if read_grads is not None:
                    lam_weights[j].add_(read_grads[j])
                lam_list[j].baddbmm_(transposed_transitions[j], next_lams[j])

            # what the recurrence does not need, for all chunks at once (chunk and batch flattened,
            # chunk-major as the buffers `states` and `lams` (N, B, k, P))
            flat = lambda t: t.flatten(0, 1)  # noqa: E731
            grad_transitions = torch.bmm(flat(lams[1:]), flat(states[:-1]).transpose(1, 2))
            lam_params = {name: flat(t) for name, t in lam_views.items()}
            flat_weights = flat(chunk_weights)  # (N B, c, k)
            row_dots, key_rows = [None] * rows, []  # per row, (N B c, 1, 1) summed over the matrices
            for m, name in enumerate(names):  # d/dw_ir = sum_m <a_m,i Lambda_m,r, delta_m,i>, contracted on the narrow side
                inputs = flat(keys.transpose(0, 1) if m == 0 else acts[m - 1])
                layer_deltas = flat(all_deltas[m])
                for row in range(rows):
                    lam = lam_params[name][:, row]
                    if lam.shape[-2] <= lam.shape[-1]:  # delta Lambda^T (N B, c, d_in); for the keys, reused below
                        back = torch.bmm(layer_deltas, lam.transpose(1, 2))
                        if m == 0:
                            key_rows.append(back)
                        row_dots[row] = _row_dot(inputs, back, row_dots[row])
                    else:
                        row_dots[row] = _row_dot(torch.bmm(inputs, lam), layer_deltas, row_dots[row])
            grad_tw = torch.cat(row_dots, dim=-1).view(-1, chunk_size, rows)
            if scale_name is not None:
                grad_tw.baddbmm_(flat(residual * normed), lam_params[scale_name].transpose(1, 2))
            # the keys: the first matrix's input in the sums (sum_r w_r delta_0 Lambda_0,r^T) and in the forward
            grad_keys = torch.bmm(flat(stacked(grad_z0)), flat(weights[names[0]]).transpose(1, 2))
            for row in range(rows):
                back = key_rows[row] if key_rows else torch.bmm(flat(all_deltas[0]), lam_params[names[0]][:, row].transpose(1, 2))
                grad_keys.addcmul_(back, flat_weights[..., row : row + 1])
            if scale_name is None:
                grad_offsets = torch.stack(grad_residuals, dim=1)
            else:
                grad_offsets = norm_backward.residual_grads().transpose(0, 1)
        return (None, lams[0].clone(), grad_keys.view(num_chunks, batch, chunk_size, dim).transpose(0, 1),
                grad_offsets, grad_tw.view(num_chunks, batch, chunk_size, rows).transpose(0, 1),
                grad_transitions.view(num_chunks, batch, rows, rows).transpose(0, 1))
