"""Per-token gradients of the built-in memory networks in closed form, batched over batch x heads.

`LinearMemory` and `MemoryMLP` are matrices with GELU between them; `ResidualNormMemory` adds
`x + LN(mlp(x)) * norm_scale / sqrt(d)`. For these, a chunk needs no autograd inside the loop:
one batched forward pass over the chunk's keys (and queries), the residuals backpropagated by
hand through the same layers with aten's own GELU and LayerNorm backward kernels, and each
layer's token-weighted gradient sums as one batched matmul,

    sum_i w_i u_i  for a matrix with inputs a_i and output gradients delta_i  =  (diag(w) A)^T Delta,

with the state's rows (weights, momentum) stacked along the rows of `diag(w) A`, so both sums
come out of one matmul. The outer backward differentiates through all of it. `naive.py` is the
reference; `functional.py` computes the same sums for any network through `torch.func`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..memory_models import LAYER_NORM_EPS, LinearMemory, MemoryMLP, ResidualNormMemory
from .chunking import clip_factors, read_at_starts
from .dual import dual_chunk_loop
from .fused import FusedChunkLoop
from .layout import FlatLayout


@dataclass
class _Saved:
    """What the forward pass keeps for the hand-written backward."""

    matrices: list  # (B, d_in, d_out) each
    inputs: list  # each matrix's input (B, n, d_in)
    hidden: list  # each GELU's input (B, n, d)
    norm: tuple | None  # residual-norm branch: (mlp output, normed, mean, rstd, norm_scale (B, 1, d))


def _weighted_sums(rows, deltas, token_weights):
    """sum over each chunk's tokens of `w_i rows_i deltas_i^T`, for each of the `k` weightings.

    rows `(B, r*c, a)`, deltas `(B, r*c, b)`, token_weights `(B, r, c, k)` -> `(B, r, k, a*b)`.
    """
    batch, span, chunk, sets = token_weights.shape
    weighted = (rows.unflatten(1, (span, chunk))[..., None, :] * token_weights[..., None]).flatten(0, 1)
    sums = torch.bmm(weighted.flatten(2).transpose(1, 2), deltas.reshape(batch * span, chunk, -1))
    return sums.view(batch, span, sets, -1)


# The chunk loop is chosen here, by measurement (docs/memory-chunks.md, `benchmarks/bench_memory.py
# --only-loops`): on a CPU, chunks of up to 4 tokens with a state of at least 2^20 elements (batch x
# heads x rows x weights, as in train_mac.py's base preset) run in dual form (`dual.py`, in
# blocks of 32 tokens), which writes the state once per block instead of after every chunk; at 8
# tokens the two were even, and below that state size the dual form's extra ops per chunk cost
# more than the state traffic it saves. Everything else, and every other device until the dual
# form is measured there, runs the fused loop (`fused.py`).
LOOPS = ("auto", "fused", "dual")
DUAL_MAX_CHUNK = 4
DUAL_MIN_STATE = 1 << 20
DUAL_BLOCK_TOKENS = 32


@dataclass(frozen=True)
class ClosedFormNetwork:
    """A built-in memory network: the matrices `matrix_names` with GELU between, optionally inside
    `x + LN(.) * norm_scale / sqrt(d)` (`scale_name`). Weights are flat, `(B, P)` in `layout` order.
    `loop`: the chunk loop, one of `LOOPS` ("auto" picks by device, chunk size and state size, see above)."""

    layout: FlatLayout
    matrix_names: tuple[str, ...]
    scale_name: str | None
    loop: str = "auto"

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {LOOPS}, got {self.loop!r}")

    def loop_for(self, state, keys) -> str:
        """The chunk loop that runs state `(B, k, P)` over keys `(B, N, c, d)`: "fused" or "dual"."""
        if self.loop != "auto":
            return self.loop
        dual = keys.device.type == "cpu" and keys.shape[2] <= DUAL_MAX_CHUNK and state.numel() >= DUAL_MIN_STATE
        return "dual" if dual else "fused"

    @classmethod
    def of(cls, model) -> "ClosedFormNetwork | None":
        """The closed form of `model`, or None when it is not exactly a built-in network."""
        residual_norm = type(model) is ResidualNormMemory
        mlp = model.model if residual_norm else model
        if type(mlp) not in (MemoryMLP, LinearMemory):
            return None
        prefix = "model." if residual_norm else ""
        matrices = tuple(f"{prefix}weights.{index}" for index in range(len(mlp.weights)))
        return cls(FlatLayout.of(model), matrices, "norm_scale" if residual_norm else None)

    def forward(self, weights, x):
        """x `(B, n, d)` read at weights `(B, P)` -> output `(B, n, d)` and what the backward needs.
        (`fused.py` runs the same layers chunk by chunk, writing into its own buffers.)"""
        params = self.layout.views(weights)
        inputs, hidden, h = [], [], x
        matrices = [params[name] for name in self.matrix_names]
        for index, matrix in enumerate(matrices):
            if index:
                hidden.append(h)
                h = F.gelu(h)
            inputs.append(h)
            h = torch.bmm(h, matrix)
        if self.scale_name is None:
            return h, _Saved(matrices, inputs, hidden, None)
        dim = x.shape[-1]
        scale = params[self.scale_name][:, None]
        normed, mean, rstd = torch.native_layer_norm(h, (dim,), None, None, LAYER_NORM_EPS)
        out = torch.addcmul(x, normed, scale, value=dim**-0.5)
        return out, _Saved(matrices, inputs, hidden, (h, normed, mean, rstd, scale))

    def read(self, weights, x):
        return self.forward(weights, x)[0]

    def chunk_loop(self, state, keys, values, terms, queries=None):
        """The state after `N` chunks `(B, k, P)` and each chunk's queries read at the weights it
        starts from `(B, N, c, d)` (None without queries): keys, values, queries `(B, N, c, d)`;
        `terms` for the `N` chunks. By the loop `loop_for` picks."""
        if self.loop_for(state, keys) == "fused":
            starts, state = self.chunk_states(state, keys, values, terms)
            return state, read_at_starts(self, starts, queries)
        offsets, token_weights = self._residual_terms(keys, values, terms)
        return dual_chunk_loop(self, state, keys, offsets, token_weights, terms.transitions, queries, DUAL_BLOCK_TOKENS)

    def chunk_states(self, state, keys, values, terms):
        """The weights before each of `N` chunks `(N, B, P)` and the state after the last
        `(B, k, P)`, by the fused loop (`fused.py`): keys, values `(B, N, c, d)`; `terms` for the
        `N` chunks."""
        offsets, token_weights = self._residual_terms(keys, values, terms)
        return FusedChunkLoop.apply(self, state, keys, offsets, token_weights, terms.transitions)

    def _residual_terms(self, keys, values, terms):
        """The loops' residual offsets and token weights (see `fused.py`)."""
        dim = keys.shape[-1]
        if self.scale_name is None:  # residual M(k) - v = mlp(k) - v
            return -values, terms.token_weights * 2.0
        # k + LN(mlp(k)) s / sqrt(d) - v
        return keys - values, terms.token_weights * (2.0 * dim**-0.5)

    def grad_sums(self, weights, keys, values, token_weights, max_grad_norm=None):
        """Token-weighted sums of the per-token gradients `u_i = grad_W ||M(k_i; W) - v_i||^2` of
        `r` chunks, all at `weights (B, P)`: keys, values `(B, r, c, d)`, token_weights
        `(B, r, c, k)` -> sums `(B, r, k, P)`."""
        batch, span, chunk, dim = keys.shape
        tokens = span * chunk
        keys = keys.reshape(batch, tokens, dim)
        out, saved = self.forward(weights, keys)

        # gradient of the loss at each layer's output, top layer first
        out_grad = 2 * (out - values.reshape(batch, tokens, dim))
        deltas = [out_grad]
        if saved.norm is not None:
            h, normed, mean, rstd, scale = saved.norm
            deltas[0] = torch.ops.aten.native_layer_norm_backward(
                out_grad * scale * dim**-0.5, h, (dim,), mean, rstd, None, None, [True, False, False]
            )[0]
        for index in reversed(range(1, len(saved.matrices))):
            back = torch.bmm(deltas[-1], saved.matrices[index].transpose(1, 2))
            deltas.append(torch.ops.aten.gelu_backward(back, saved.hidden[index - 1]))
        deltas.reverse()
        inputs = saved.inputs
        scale_rows = out_grad * normed * dim**-0.5 if saved.norm is not None else None

        if max_grad_norm is not None:
            # ||u_i||^2: a matrix's per-token gradient a_i delta_i^T has norm ||a_i|| ||delta_i||
            squared = sum(a.square().sum(-1) * g.square().sum(-1) for a, g in zip(inputs, deltas))
            if scale_rows is not None:
                squared = squared + scale_rows.square().sum(-1)
            norms = squared.clamp(min=torch.finfo(squared.dtype).tiny).sqrt()
            token_weights = token_weights * clip_factors(norms, max_grad_norm).view(batch, span, chunk, 1)

        sums = {name: _weighted_sums(a, g, token_weights) for name, a, g in zip(self.matrix_names, inputs, deltas)}
        if scale_rows is not None:
            sums[self.scale_name] = self._scale_sums(scale_rows, token_weights)
        return torch.cat([sums[name] for name in self.layout.names], dim=-1)

    @staticmethod
    def _scale_sums(scale_rows, token_weights):
        """sum_i w_i g_i for per-token gradients `scale_rows (B, r*c, d)` of a vector parameter."""
        batch, span, chunk, sets = token_weights.shape
        weights = token_weights.reshape(batch * span, chunk, sets).transpose(1, 2)
        return torch.bmm(weights, scale_rows.reshape(batch * span, chunk, -1)).view(batch, span, sets, -1)
