"""`NeuralMemory`: the Titans long-term memory as an `nn.Module`, and its streaming state."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from tensordict import TensorDict
from torch import nn

from .checks import check_positive_ints
from .memory import network_for
from .memory.chunking import run_chunks, update_terms
from .memory.layout import FlatLayout
from .memory.scan import BACKENDS
from .memory_models import ResidualNormMemory, validate_memory_model


@dataclass
class NeuralMemoryState:
    """Everything a `NeuralMemory` carries from one call to the next.

    - `flat`: the fast weights `W_t` (row 0) and the momentum `S_t` (row 1, when momentum is
      on), each flattened to one vector: `(batch, heads, rows, P)`;
    - `layout`: where each of the memory model's parameters lies in those vectors;
      `weights` and `momentum` give them by name, as TensorDicts of views with batch size
      `(batch, heads)` (`momentum` is None when momentum is off);
    - `pending`: keys, values and gates `(batch, heads, p, ...)` of the `p < chunk_size`
      tokens of a chunk that is not complete yet (they are stored once it is), or None;
    - `conv`: the last `kernel - 1` inputs of each causal convolution (`"query"`, `"key"`,
      `"value"`), so that a sequence split across calls is convolved as one;
    - `position`: how many tokens have been stored (including pending ones).

    `detach()` cuts the autograd history (truncated backprop across training steps).
    """

    flat: torch.Tensor
    layout: FlatLayout
    pending: TensorDict | None
    conv: dict
    position: int

    def _by_name(self, row):
        return TensorDict(self.layout.views(self.flat[:, :, row]), batch_size=self.flat.shape[:2])

    @property
    def weights(self) -> TensorDict:
        return self._by_name(0)

    @property
    def momentum(self) -> TensorDict | None:
        return self._by_name(1) if self.flat.shape[2] == 2 else None

    def detach(self) -> "NeuralMemoryState":
        return NeuralMemoryState(
            flat=self.flat.detach(),
            layout=self.layout,
            pending=self.pending.detach() if self.pending is not None else None,
            conv={name: t.detach() for name, t in self.conv.items()},
            position=self.position,
        )

    @property
    def batch_size(self) -> int:
        return self.flat.shape[0]


# a state's caches of the causal convolutions: the queries', the keys' and the values' (keys and
# values share one convolution module, its channels the keys' then the values')
CONV_CACHES = ("query", "key", "value")


def l2_normalize(x, eps: float = 1e-12):
    """`F.normalize(x, dim=-1)`, `x / max(||x||, eps)`, from a dot product per row (`linalg.vecdot`,
    a multiply and a sum at the aten level): on the token-major layout it measured about half the
    cost of `F.normalize`'s norm kernel, forward and backward.
    Computed in float32 at least (the memory's inner loop takes its keys, values and queries in
    float32 anyway), so half-precision inputs under autocast lose nothing in the norm."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.linalg.vecdot(x, x).unsqueeze(-1).clamp_min(eps * eps).rsqrt()


class CausalDepthwiseConv(nn.Module):
    """Depthwise 1-D convolution over time that sees only the past; streams via a cache."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    # at most this many new positions (decoding steps) go through a multiply-and-sum over the
    # windows instead: on a CPU a depthwise convolution costs about 100 us a call however short
    SHORT = 16

    def forward(self, x, cache, channels: slice | None = None):
        """x `(b, n, c)`, cache `(b, kernel - 1, c)` -> (out `(b, n, c)`, the inputs with the cache in
        front `(b, kernel - 1 + n, c)`: the cache after the first `i` tokens is `inputs[:, i : i + kernel - 1]`).
        `channels`: only these of the module's channels (x and cache have only those)."""
        weight = self.conv.weight if channels is None else self.conv.weight[channels]
        new = x.shape[1]
        x = torch.cat((cache.to(x.dtype), x), dim=1)
        if new <= self.SHORT:  # (b, n, channels, kernel) windows times the (channels, kernel) filters
            out = (x.unfold(1, self.kernel_size, 1) * weight[:, 0].to(x.dtype)).sum(-1)
        else:
            out = F.conv1d(x.transpose(1, 2), weight, groups=weight.shape[0]).transpose(1, 2)
        return out, x


def conv_cache(inputs, new: int, width: int, kept: bool = True):
    """The cache after the first `new` tokens of a convolution's `inputs` (cache in front,
    `(b, width + n, c)`). For a state a caller keeps (`kept`), a copy when the inputs hold more than a
    decoding step's worth (so that it does not keep a whole call's inputs alive); else a view (a
    decoding step dispatches nothing for it, nor does the next piece of a stretch)."""
    cache = inputs[:, new : new + width]
    return cache.clone() if kept and inputs.shape[1] > width + CausalDepthwiseConv.SHORT else cache


@dataclass
class Addresses:
    """The keys and queries of a stretch of tokens, computed once for a memory that then writes the
    stretch piece by piece (memory as context: keys and queries come from the tokens, values from
    each segment's attention output). From `NeuralMemory.addresses`; `split(sizes)` cuts it into the
    pieces' for `NeuralMemory.forward(..., addresses=)`.

    - `normed`: the normed tokens `(b, n, dim)`;
    - `read_queries`: the queries without the convolution `(b, h, n, d)` (as `read_queries`'s);
    - `queries`, `keys`: as `forward` computes them from its own input, `(b, h, n, d)`;
    - `conv_inputs`: the query and key convolutions' inputs with their caches in front,
      `{"query": (b, kernel - 1 + n, h d), "key": ...}` (empty without convolutions), shared by the pieces;
    - `end`: where the stretch (or piece) ends in them, so that its caches are `conv_caches`;
    - `position`: the memory's position at the stretch's (or piece's) first token: a piece is
      written from a state at that position (in order, each once).
    """

    normed: torch.Tensor
    read_queries: torch.Tensor
    queries: torch.Tensor
    keys: torch.Tensor
    conv_inputs: dict
    end: int
    position: int

    def split(self, sizes) -> list["Addresses"]:
        """The consecutive pieces of `sizes` tokens, each tensor cut by one split (autograd then
        joins the pieces' gradients once, rather than a full-size zero tensor per piece)."""
        sizes = list(sizes)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        first = self.end - self.normed.shape[1]
        parts = zip(self.normed.split(sizes, 1), self.read_queries.split(sizes, 2), self.queries.split(sizes, 2),
                    self.keys.split(sizes, 2))
        return [Addresses(*tensors, self.conv_inputs, first + start + size, self.position + start)
                for tensors, start, size in zip(parts, starts, sizes)]

    def ends_stretch(self, width: int) -> bool:
        """Whether this piece is the stretch's last (its state is the one a caller keeps)."""
        return all(self.end + width == t.shape[1] for t in self.conv_inputs.values())

    def conv_caches(self, width: int) -> dict:
        """The query and key convolutions' caches after the stretch (or piece): views into the whole
        stretch's inputs, but for its last piece (the state a caller keeps, `conv_cache`)."""
        kept = self.ends_stretch(width)
        return {name: conv_cache(t, self.end, width, kept) for name, t in self.conv_inputs.items()}


class NeuralMemory(nn.Module):
    """The neural long-term memory of Titans (Behrouz et al., 2024).

    `mem(seq)` with `seq (batch, seq_len, dim)` returns the retrieved sequence, same shape.
    Tokens of chunk `j` read the memory as it stood after chunk `j - 1`, then the chunk is
    written into it (retrieve, then store); output `t` depends on inputs `<= t` only.
    `mem(seq, state=state, return_state=True)` returns `(retrieved, state)` and continues
    from `state` (None: the learned initial memory). `retrieve` and `store` do the two
    halves separately (used by memory-as-context).

    Arguments follow the paper: `chunk_size` tokens share a gradient point; per token and
    head a learning rate `theta` (at most `max_lr`), momentum `eta` and forgetting `alpha` are
    predicted from the input (sigmoids initialised at `init_lr * max_lr`, `init_momentum`,
    `init_forget`); keys and queries are L2-normalised, and so are the values (the targets),
    unless `value_l2norm=False`. With the defaults (`max_lr=0.025`, normalised values) the default
    deep memory, momentum on, learned recall in every setting we tried; the earlier `1 / chunk_size`
    bound with raw values did not at chunk 8 (README, "Stability").
    `momentum=False` / `forget=False` switch those terms off. `refresh_every=k` takes the
    gradients of `k` consecutive chunks at one point (faster, weaker; default 1, the paper's
    form; a call that ends inside a span starts a new span on the next call, so streaming
    equals one call only for pieces that are multiples of `k * chunk_size`). `max_grad_norm`
    clips each token's inner gradient. `model` is the memory network
    on `dim_head` features (default `ResidualNormMemory`, `x + LN(mlp(x))`).
    """

    def __init__(
        self,
        dim: int,
        chunk_size: int = 16,
        heads: int = 1,
        dim_head: int | None = None,
        model: nn.Module | None = None,
        pre_rmsnorm: bool = True,
        momentum: bool = True,
        forget: bool = True,
        max_lr: float = 0.025,
        init_lr: float = 0.5,
        init_momentum: float = 0.9,
        init_forget: float = 0.01,
        qkv_activation: bool = True,
        conv_kernel_size: int | None = 4,
        qk_l2norm: bool = True,
        value_l2norm: bool = True,
        refresh_every: int = 1,
        max_grad_norm: float | None = None,
        scan_backend: str = "auto",
    ):
        super().__init__()
        check_positive_ints(dim=dim, chunk_size=chunk_size, heads=heads, refresh_every=refresh_every)
        if dim_head is None:
            if dim % heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when dim_head is not given")
            dim_head = dim // heads
        check_positive_ints(dim_head=dim_head)
        if not max_lr > 0:
            raise ValueError(f"max_lr must be positive, got {max_lr}")
        for name, value in (("init_lr", init_lr), ("init_momentum", init_momentum), ("init_forget", init_forget)):
            if not 0 < value < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS}, got {scan_backend!r}")
        if conv_kernel_size is not None and (not isinstance(conv_kernel_size, int) or conv_kernel_size < 1):
            raise ValueError(f"conv_kernel_size must be a positive integer or None, got {conv_kernel_size!r}")

        self.dim, self.heads, self.dim_head, self.chunk_size = dim, heads, dim_head, chunk_size
        self.max_lr, self.refresh_every, self.max_grad_norm = max_lr, refresh_every, max_grad_norm
        self.scan_backend, self.qk_l2norm, self.qkv_activation = scan_backend, qk_l2norm, qkv_activation
        self.value_l2norm = value_l2norm
        dim_inner = heads * dim_head

        self.model = model if model is not None else ResidualNormMemory(dim_head)
        validate_memory_model(self.model, dim_head)
        self.network = network_for(self.model)  # closed form for the built-in models, torch.func for others

        self.norm = nn.RMSNorm(dim) if pre_rmsnorm else nn.Identity()
        self.to_queries = nn.Linear(dim, dim_inner, bias=False)
        self.to_keys_values = nn.Linear(dim, 2 * dim_inner, bias=False)
        self.conv_kernel_size = conv_kernel_size if conv_kernel_size and conv_kernel_size > 1 else None
        if self.conv_kernel_size:
            self.query_conv = CausalDepthwiseConv(dim_inner, self.conv_kernel_size)
            self.key_value_conv = CausalDepthwiseConv(2 * dim_inner, self.conv_kernel_size)

        # data-dependent gates, one scalar per token and head (theta, eta, alpha)
        self.to_lr = self._gate(dim, heads, init_lr)
        self.to_momentum = self._gate(dim, heads, init_momentum) if momentum else None
        self.to_forget = self._gate(dim, heads, init_forget) if forget else None

        # output: per-head RMSNorm, then a per-head sigmoid gate and a projection when heads > 1
        self.out_norm_scale = nn.Parameter(torch.ones(heads, dim_head))
        self.out_gate = nn.Linear(dim, heads) if heads > 1 else None
        self.to_out = nn.Linear(dim_inner, dim, bias=False) if (heads > 1 or dim_inner != dim) else nn.Identity()

    @staticmethod
    def _gate(dim, heads, init):
        gate = nn.Linear(dim, heads)
        nn.init.normal_(gate.weight, std=0.02)
        nn.init.constant_(gate.bias, math.log(init / (1 - init)))
        return gate

    # ------------------------------------------------------------------ state

    def init_state(self, batch: int, device=None, dtype=None) -> NeuralMemoryState:
        """The learned initial memory `W_0` for `batch` sequences, zero momentum, nothing pending."""
        layout = self.network.layout
        initial = layout.flatten(dict(self.model.named_parameters()), leading=0)
        device = device or initial.device
        dtype = dtype or torch.promote_types(initial.dtype, torch.float32)
        rows = [initial.to(device=device, dtype=dtype).expand(batch, self.heads, -1)]
        if self.to_momentum is not None:
            rows.append(torch.zeros(batch, self.heads, layout.size, device=device, dtype=dtype))
        conv = {}
        if self.conv_kernel_size:
            width = self.conv_kernel_size - 1
            inner = self.heads * self.dim_head
            conv = {name: torch.zeros(batch, width, inner, device=device, dtype=dtype) for name in CONV_CACHES}
        return NeuralMemoryState(torch.stack(rows, dim=2), layout, None, conv, 0)

    def _check_input(self, seq, name="seq"):
        if not torch.is_tensor(seq):
            raise TypeError(f"{name} must be a tensor of shape (batch, seq_len, {self.dim}), got {type(seq).__name__}")
        if seq.ndim != 3 or seq.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape (batch, seq_len, dim={self.dim}), got {tuple(seq.shape)}")
        if not seq.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {seq.dtype}")

    def _check_state(self, state, batch, device, dtype):
        if state is None:
            return self.init_state(batch, device=device, dtype=dtype)
        if not isinstance(state, NeuralMemoryState):
            raise TypeError(f"state must be a NeuralMemoryState or None, got {type(state).__name__}")
        layout = self.network.layout
        if state.layout != layout or tuple(state.flat.shape[:2]) != (batch, self.heads):
            expected = {name: (batch, self.heads, *shape) for name, shape in zip(layout.names, layout.shapes)}
            found = {name: (*state.flat.shape[:2], *shape) for name, shape in zip(state.layout.names, state.layout.shapes)}
            raise ValueError(
                "state does not belong to this memory (different batch size, heads or memory model): "
                f"expected weights {expected}, got {found}"
            )
        if (state.flat.shape[2] == 2) != (self.to_momentum is not None):
            raise ValueError("state does not belong to this memory: momentum is on in one and off in the other")
        if set(state.conv) != (set(CONV_CACHES) if self.conv_kernel_size else set()):
            raise ValueError("state does not belong to this memory: its convolution caches differ")
        return state

    # ------------------------------------------------------------ projections

    def _queries(self, x, state=None, convolve=True):
        queries = self.to_queries(x)
        if self.qkv_activation:
            queries = F.silu(queries)
        conv = dict(state.conv) if state is not None else {}
        if self.conv_kernel_size and convolve:
            queries, inputs = self.query_conv(queries, state.conv["query"])
            conv["query"] = conv_cache(inputs, queries.shape[1], self.conv_kernel_size - 1)
        return self._query_heads(queries), conv

    def _query_heads(self, queries):
        """Projected queries `(b, n, h d)` -> per head, L2-normalised with `qk_l2norm`, `(b, h, n, d)`."""
        queries = queries.unflatten(-1, (self.heads, self.dim_head))
        if self.qk_l2norm:
            queries = l2_normalize(queries)
        return queries.transpose(1, 2)

    def _keys_values_gates(self, x, state):
        inner = self.heads * self.dim_head
        keys_values = self.to_keys_values(x)
        if self.qkv_activation:
            keys_values = F.silu(keys_values)
        conv = dict(state.conv)
        if self.conv_kernel_size:
            cache = torch.cat((state.conv["key"], state.conv["value"]), dim=-1)
            keys_values, inputs = self.key_value_conv(keys_values, cache)
            conv["key"], conv["value"] = conv_cache(inputs, keys_values.shape[1], self.conv_kernel_size - 1).split(inner, dim=-1)
        keys_values = keys_values.unflatten(-1, (2, self.heads, self.dim_head))  # (b, n, 2, h, d)
        if self.qk_l2norm and self.value_l2norm:
            keys_values = l2_normalize(keys_values)  # both in one op
        keys, values = keys_values.unbind(2)
        if self.qk_l2norm and not self.value_l2norm:
            keys = l2_normalize(keys)
        if self.value_l2norm and not self.qk_l2norm:
            values = l2_normalize(values)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # (b, h, n, d)
        return keys, values, self._gates(x), conv

    def _values_gates(self, x, state, addresses):
        """`_keys_values_gates` with the keys computed beforehand (a piece's `addresses`): the values
        and gates of `x`, and the convolutions' caches after the piece."""
        inner = self.heads * self.dim_head
        values = F.linear(x, self.to_keys_values.weight[inner:])
        if self.qkv_activation:
            values = F.silu(values)
        conv = {}
        if self.conv_kernel_size:
            values, inputs = self.key_value_conv(values, state.conv["value"], channels=slice(inner, None))
            width = self.conv_kernel_size - 1
            value_cache = conv_cache(inputs, values.shape[1], width, addresses.ends_stretch(width))
            conv = {**addresses.conv_caches(width), "value": value_cache}
        values = values.unflatten(-1, (self.heads, self.dim_head))
        if self.value_l2norm:
            values = l2_normalize(values)
        return values.transpose(1, 2), self._gates(x), conv

    def _gates(self, x):
        """The gates of `x (b, n, dim)`, per token and head `(b, h, n)`: theta, log eta, log (1 - alpha)."""
        to_heads = lambda t: rearrange(t, "b n h -> b h n")  # noqa: E731
        gates = {"lr": self.max_lr * torch.sigmoid(to_heads(self.to_lr(x)))}
        if self.to_momentum is not None:
            gates["log_momentum"] = F.logsigmoid(to_heads(self.to_momentum(x)))  # log eta
        if self.to_forget is not None:
            gates["log_retain"] = F.logsigmoid(-to_heads(self.to_forget(x)))  # log (1 - alpha)
        return gates

    def _output(self, retrieved, x):
        """retrieved `(b, h, n, d)` -> `(b, n, dim)`: per-head RMSNorm, gate, merge, project."""
        retrieved = F.rms_norm(retrieved, retrieved.shape[-1:]) * self.out_norm_scale[:, None].to(retrieved.dtype)
        retrieved = retrieved.to(x.dtype)
        if self.out_gate is not None:
            retrieved = retrieved * rearrange(torch.sigmoid(self.out_gate(x)), "b n h -> b h n 1")
        return self.to_out(rearrange(retrieved, "b h n d -> b n (h d)"))

    # ------------------------------------------------------------- core paths

    def _inner_dtype(self, dtype):
        # the test-time optimisation runs in float32 (or float64 when given), never in half precision
        return torch.promote_types(dtype, torch.float32)

    def _read(self, state, queries):
        """queries `(b, h, n, d)` read at the state's weights -> `(b, h, n, d)`."""
        weights = state.flat[:, :, 0].flatten(0, 1)
        out = self.network.read(weights, queries.flatten(0, 1).to(weights.dtype))
        return out.view(*queries.shape[:2], *out.shape[1:])

    def _advance(self, state, keys, values, gates, queries=None):
        """Store keys/values/gates `(b, h, n, ...)` after `state.pending`; read queries aligned
        with the new tokens at their chunk-start weights. Returns (state, retrieved or None)."""
        batch, heads, new = keys.shape[:3]
        inner = self._inner_dtype(keys.dtype)
        fields = {"keys": keys, "values": values, **gates}
        fields = {name: t.to(inner) for name, t in fields.items()}
        pending = 0
        if state.pending is not None:
            pending = state.pending["keys"].shape[2]
            fields = {name: torch.cat((state.pending[name], t), dim=2) for name, t in fields.items()}
        total = pending + new
        whole = (total // self.chunk_size) * self.chunk_size
        num_chunks = whole // self.chunk_size

        if queries is not None:
            queries = queries.to(inner)
            if pending:
                queries = torch.cat((queries.new_zeros(batch, heads, pending, queries.shape[-1]), queries), dim=2)

        def chunked(t):  # contiguous: the loop's reshapes stay views
            if t is None:
                return None
            return t[:, :, :whole].reshape(batch * heads, num_chunks, self.chunk_size, *t.shape[3:]).contiguous()

        flat, retrieved = state.flat, None
        if num_chunks:
            terms = update_terms(chunked(fields["lr"]), chunked(fields.get("log_momentum")), chunked(fields.get("log_retain")))
            flat, retrieved = run_chunks(
                self.network, flat.flatten(0, 1), chunked(fields["keys"]), chunked(fields["values"]), terms,
                chunked(queries), self.refresh_every, self.max_grad_norm, self.scan_backend,
            )
            flat = flat.view(batch, heads, *flat.shape[1:])

        rest = {name: t[:, :, whole:] for name, t in fields.items()}
        new_pending = TensorDict(rest, batch_size=[batch, heads]) if total > whole else None
        new_state = NeuralMemoryState(flat, state.layout, new_pending, state.conv, state.position + new)

        if queries is None:
            return new_state, None
        outputs = []
        if num_chunks:
            outputs.append(retrieved.reshape(batch, heads, whole, -1))
        if total > whole:
            outputs.append(self._read(new_state, queries[:, :, whole:]))
        return new_state, torch.cat(outputs, dim=2)[:, :, pending:]

    # ------------------------------------------------------------- public API

    def forward(self, seq, state: NeuralMemoryState | None = None, return_state: bool = False, key_seq=None,
                addresses: Addresses | None = None):
        """seq `(batch, seq_len, dim)` -> retrieved `(batch, seq_len, dim)` [, state].

        With `key_seq` (same shape), the keys and the queries are computed from `key_seq` and the
        values and gates from `seq`: the memory stores `seq` addressed by `key_seq` (memory as
        context stores the attention output, addressed by the tokens). With `addresses` instead
        (`self.addresses(key_seq, state)`, or one of its pieces), they were computed beforehand,
        once for a longer stretch that is then written piece by piece."""
        self._check_input(seq)
        state = self._check_state(state, seq.shape[0], seq.device, self._inner_dtype(seq.dtype))
        x = self.norm(seq)
        if key_seq is not None:  # addressed by other tokens: their keys and queries, as one stretch
            if addresses is not None:
                raise ValueError("give key_seq or addresses, not both")
            self._check_input(key_seq, "key_seq")
            if key_seq.shape != seq.shape:
                raise ValueError(f"key_seq must have the shape of seq {tuple(seq.shape)}, got {tuple(key_seq.shape)}")
            addresses = self.addresses(key_seq, state)
        if addresses is not None:
            self._check_addresses(addresses, seq, state)
            keys, queries = addresses.keys, addresses.queries
            values, gates, conv = self._values_gates(x, state, addresses)
        else:
            queries, conv = self._queries(x, state)
            keys, values, gates, conv = self._keys_values_gates(x, replace(state, conv=conv))
        with torch.autocast(seq.device.type, enabled=False):
            state, retrieved = self._advance(state, keys, values, gates, queries)
        state = replace(state, conv=conv)
        out = self._output(retrieved, x)
        return (out, state) if return_state else out

    def _check_addresses(self, addresses, seq, state):
        expected = (f"the Addresses of seq's {seq.shape[1]} tokens of {seq.shape[0]} sequences, {self.heads} heads of "
                    f"{self.dim_head} (NeuralMemory.addresses, or one of its pieces)")
        if not isinstance(addresses, Addresses):
            raise TypeError(f"addresses must be {expected}, got {type(addresses).__name__}")
        batch, heads, length, dim_head = addresses.keys.shape
        if (batch, length, heads, dim_head) != (seq.shape[0], seq.shape[1], self.heads, self.dim_head):
            raise ValueError(f"addresses must be {expected}, got those of {length} tokens of {batch} sequences, "
                             f"{heads} heads of {dim_head}")
        if addresses.position != state.position:
            raise ValueError(f"addresses start at position {addresses.position} but the state is at {state.position}: "
                             "write the pieces in order, each once, from the state the stretch began at")

    def addresses(self, key_seq, state: NeuralMemoryState | None = None) -> Addresses:
        """The keys and queries of `key_seq (batch, n, dim)` continuing `state` (None: the initial
        memory), as `forward(seq, state, key_seq=key_seq)` uses them, for a caller that writes
        the stretch piece by piece, `forward(piece, state, addresses=...)` with each piece's
        (`Addresses.split`). Memory as context computes them once per call, and reads its
        retrieved tokens with the same normed tokens and unconvolved queries (`normed`, `read_queries`)."""
        self._check_input(key_seq, "key_seq")
        state = self._check_state(state, key_seq.shape[0], key_seq.device, self._inner_dtype(key_seq.dtype))
        inner = self.heads * self.dim_head
        x = self.norm(key_seq)
        queries, keys = self.to_queries(x), F.linear(x, self.to_keys_values.weight[:inner])
        if self.qkv_activation:
            queries, keys = F.silu(queries), F.silu(keys)
        read_queries = self._query_heads(queries)
        conv_inputs = {}
        if self.conv_kernel_size:
            queries, conv_inputs["query"] = self.query_conv(queries, state.conv["query"])
            keys, conv_inputs["key"] = self.key_value_conv(keys, state.conv["key"], channels=slice(0, inner))
        keys = keys.unflatten(-1, (self.heads, self.dim_head))
        if self.qk_l2norm:
            keys = l2_normalize(keys)
        return Addresses(x, read_queries, self._query_heads(queries), keys.transpose(1, 2), conv_inputs, key_seq.shape[1],
                         state.position)

    def retrieve(self, seq, state: NeuralMemoryState | None = None, convolve: bool = True):
        """Read the memory without writing: seq `(batch, n, dim)` -> `(retrieved, state)`.

        Reads at `state.weights` (the start of the current chunk). With `convolve=False`
        the query convolution is skipped and its cache untouched (for token sets that are
        not a time series, such as learned query tokens).
        """
        self._check_input(seq)
        state = self._check_state(state, seq.shape[0], seq.device, self._inner_dtype(seq.dtype))
        x = self.norm(seq)
        queries, conv = self._queries(x, state, convolve)
        with torch.autocast(seq.device.type, enabled=False):
            retrieved = self._read(state, queries.to(self._inner_dtype(queries.dtype)))
        return self._output(retrieved, x), replace(state, conv=conv)

    def read_queries(self, seq):
        """The read queries of `seq (batch, n, dim)`, token by token (no convolution), for `read`:
        returns `(normed seq, queries (batch, heads, n, dim_head))`. `read_queries` then `read` is
        `retrieve(seq, state, convolve=False)` without its checks, for a caller (memory as context)
        that validated its input, projects a whole sequence once and reads it at several states."""
        x = self.norm(seq)
        return x, self._queries(x, convolve=False)[0]

    def read(self, state: NeuralMemoryState, x, queries):
        """`read_queries`'s output read at `state`'s weights -> `(batch, n, dim)`."""
        with torch.autocast(x.device.type, enabled=False):
            retrieved = self._read(state, queries.to(self._inner_dtype(queries.dtype)))
        return self._output(retrieved, x)

    def store(self, seq, state: NeuralMemoryState | None = None) -> NeuralMemoryState:
        """Write seq `(batch, n, dim)` into the memory; returns the new state."""
        self._check_input(seq)
        state = self._check_state(state, seq.shape[0], seq.device, self._inner_dtype(seq.dtype))
        x = self.norm(seq)
        keys, values, gates, conv = self._keys_values_gates(x, state)
        with torch.autocast(seq.device.type, enabled=False):
            state, _ = self._advance(state, keys, values, gates)
        return replace(state, conv=conv)
