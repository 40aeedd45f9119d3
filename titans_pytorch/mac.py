"""Memory as Context (MAC), section 4.1 of the paper."""

from __future__ import annotations

import torch
from torch import nn

from .attention import LocalAttention, segment_pieces, split_pieces
from .checks import check_non_negative_ints, check_positive_ints
from .neural_memory import NeuralMemory
from .transformer import MemoryGate, MixerCache, TitansTransformer, build_memories


def _joined(pieces):
    """The pieces' outputs `(b, n_i, dim)` joined along the sequence (one piece: itself, no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


class MemoryAsContextMixer(nn.Module):
    """One MAC sequence mixer. For each segment `s` of `segment_len` tokens, with `M_{s-1}` the
    memory as it stood before the segment:

    1. retrieve: `h_t = M_{s-1}(q_t)` for each token `t` of the segment (`q_t` the memory's
       query of `x_t`), and `num_longterm_mem_tokens` tokens `M_{s-1}(q_l)` read at learned
       query tokens `q_l` (a data-independent summary);
    2. attend causally over `[persistent || long-term || h || segment]`, giving `Attn`: token `t`
       sees `h_i` and `x_i` for `i <= t` of its segment (or window), so nothing leaks from
       the future;
    3. store the attention layer's output in the residual stream, `y = x + Attn(...)`, in
       the memory (the paper's `M_t = M_{t-1}(y_t)`; `x` is the mixer's input, with
       hyper-connections the streams' mix), addressed by the tokens: the values are computed
       from `y`, the keys (and all queries) from `x`, as `h_t`'s queries are, and
    4. gated read: `out = sigmoid(RMSNorm(Attn(...))) * RMSNorm(M(x))` (`MemoryGate`, as in
       MAG), each token reading the memory as updated by the chunks before its own
       (retrieve-then-store inside the segment, so causal); the block adds `out` to the stream.

    Why `x + Attn` and not the attention branch alone: the branch is what attention adds to
    the stream, a mix of the segment's tokens with little of the token itself at first, so
    "this key, this value" reaches the memory only once attention has learned to put it
    there. Why keys from `x`: attention mixes the rest of the segment into `y`, and with keys
    computed from `y` the memory could not tell facts apart (it kept a bag of values;
    docs/recall.md).

    Without a memory (`memory=None`) it is plain segment / sliding-window attention with
    persistent tokens.
    """

    def __init__(
        self,
        dim,
        heads,
        dim_head,
        segment_len,
        num_persist_mem_tokens,
        num_longterm_mem_tokens,
        sliding,
        memory: NeuralMemory | None,
    ):
        super().__init__()
        self.segment_len = segment_len
        # with a memory, each position adds two keys: its retrieved memory token's and its own
        self.attention = LocalAttention(dim, heads, dim_head, segment_len, num_persist_mem_tokens, sliding,
                                        keys_per_position=2 if memory is not None else 1)
        self.memory = memory
        self.gate = MemoryGate(dim) if memory is not None else None
        self.longterm_queries = None
        if memory is not None and num_longterm_mem_tokens:
            self.longterm_queries = nn.Parameter(torch.randn(num_longterm_mem_tokens, dim) * 0.02)

    def _init_cache(self, x):
        batch = x.shape[0]
        memory = None
        if self.memory is not None:
            memory = self.memory.init_state(batch, device=x.device, dtype=self.memory._inner_dtype(x.dtype))
        return MixerCache(self.attention.empty_cache(batch, x.device, x.dtype), memory)

    def forward(self, x, position: int, cache: MixerCache | None = None, masks: dict | None = None):
        cache = cache if cache is not None else self._init_cache(x)
        batch, length = x.shape[:2]
        attn_cache, memory_state, prefix, segment_memory = cache.attention, cache.memory, cache.prefix, cache.segment_memory
        masks = {} if masks is None else masks  # shared by the forward's pieces and layers (attend, project)
        q, k, v, normed = self.attention.project(x, position, masks)
        # every per-token tensor cut into the pieces once (one split each, not a slice per piece)
        pieces = list(segment_pieces(position, length, self.segment_len))
        split = lambda t, dim=1: split_pieces(pieces, t, dim)  # noqa: E731
        q, k, v = split(q, 2), split(k, 2), split(v, 2)
        x_pieces, normed = split(x), split(normed)
        persistent = None  # without a memory: every segment's prefix of persistent tokens, projected at once
        if self.memory is not None:
            # the memory's keys and queries of every token, projected and convolved once (each piece's
            # values come from its attention output), and those of the long-term query tokens
            addresses = self.memory.addresses(x, memory_state).split([end - start for start, end in pieces])
            if self.longterm_queries is not None:
                longterm_x, longterm_queries = self.memory.read_queries(self.longterm_queries.to(x.dtype).expand(batch, -1, -1))
        outputs, memory_reads = [], []
        for index, (start, end) in enumerate(pieces):
            piece_position = position + start
            # a segment starts here, or this is the first piece a fresh cache sees (the prefix is None
            # for good without persistent and long-term tokens: that alone does not start a segment)
            new_segment = piece_position % self.segment_len == 0 or (prefix is None and segment_memory is None)
            keys, values = k[index], v[index]
            if self.memory is None:
                if new_segment:
                    if persistent is None:  # (a step inside a segment needs none: its prefix is cached)
                        persistent = self.attention.persistent_prefixes(position, pieces, batch)
                    prefix = persistent[index]
            else:
                if new_segment:
                    segment_memory = memory_state  # M_{s-1}
                # one read at M_{s-1}: h_t = M_{s-1}(q_t) for the piece's tokens and, at a segment's
                # start, the long-term tokens
                reads_x, reads_queries = addresses[index].normed, addresses[index].read_queries
                longterm = new_segment and self.longterm_queries is not None
                if longterm:
                    reads_x = torch.cat((longterm_x, reads_x), dim=1)
                    reads_queries = torch.cat((longterm_queries, reads_queries), dim=2)
                read = self.memory.read(segment_memory, reads_x, reads_queries)
                if longterm:
                    longterm_read, retrieved = read.split([read.shape[1] - (end - start), end - start], dim=1)
                else:
                    longterm_read, retrieved = None, read
                # each h_t is seen by the tokens at and after t: its key sits beside x_t's
                positions = self.attention.positions(piece_position, end - start, x.device)
                if new_segment:  # the segment's prefix (persistent and long-term tokens) from the same projection
                    prefix, (retrieved_keys, retrieved_values) = self.attention.prefix_keys_values(
                        longterm_read, piece_position, batch, extra=retrieved, extra_positions=positions
                    )
                else:
                    retrieved_keys, retrieved_values = self.attention.keys_values(retrieved, positions)
                keys = torch.stack((retrieved_keys, keys), dim=3).flatten(2, 3)
                values = torch.stack((retrieved_values, values), dim=3).flatten(2, 3)
            y, attn_cache = self.attention.attend(q[index], keys, values, piece_position, attn_cache, prefix, masks)
            y = self.attention.to_out(y, normed[index])
            if self.memory is not None:
                # the attention layer's output in the residual stream, x_t + Attn_t, is what the
                # memory stores and reads (the paper's y_t; see the class docstring)
                attended = x_pieces[index] + y
                # ... addressed by the tokens: keys and queries from x (as h_t's queries), values from y
                memory_read, memory_state = self.memory(attended, state=memory_state, return_state=True,
                                                        addresses=addresses[index])
                memory_reads.append(memory_read)
            outputs.append(y)
        if prefix is not None:  # a cache holds its own memory (the persistent prefixes are batch-expanded views)
            prefix = tuple(t.contiguous() for t in prefix)
        out = _joined(outputs)
        if self.memory is not None:  # the gated read, token by token: once for all the pieces
            out = self.gate(out, _joined(memory_reads))
        return out, MixerCache(attn_cache, memory_state, prefix, segment_memory)


class MemoryAsContextTransformer(TitansTransformer):
    """Titans MAC language model.

    `segment_len`: attention window (block attention inside segments, or a sliding window
    of that length with `sliding_window_attn=True`). `num_persist_mem_tokens`: learned,
    data-independent tokens every query sees. `num_longterm_mem_tokens`: tokens read from
    each memory layer's neural memory before every segment. `neural_memory_layers`:
    1-indexed layers with a memory (None: all; () : none). `neural_memory_kwargs`: passed
    to `NeuralMemory` (chunk_size, heads, dim_head, momentum, ...); `neural_memory_model`:
    the memory network (copied per layer). `num_residual_streams`: hyper-connection
    streams (1 = plain residual).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        segment_len: int,
        num_persist_mem_tokens: int = 0,
        num_longterm_mem_tokens: int = 0,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: float = 4.0,
        neural_memory_layers=None,
        neural_memory_kwargs: dict | None = None,
        neural_memory_model: nn.Module | None = None,
        num_residual_streams: int = 4,
        sliding_window_attn: bool = False,
    ):
        check_positive_ints(depth=depth, segment_len=segment_len, heads=heads, dim_head=dim_head)
        check_non_negative_ints(num_persist_mem_tokens=num_persist_mem_tokens, num_longterm_mem_tokens=num_longterm_mem_tokens)
        memories = build_memories(depth, dim, neural_memory_layers, neural_memory_kwargs, neural_memory_model, segment_len)
        mixers = [
            MemoryAsContextMixer(
                dim, heads, dim_head, segment_len, num_persist_mem_tokens, num_longterm_mem_tokens, sliding_window_attn, memory
            )
            for memory in memories
        ]
        super().__init__(num_tokens, dim, mixers, ff_mult, num_residual_streams)
        self.segment_len = segment_len
