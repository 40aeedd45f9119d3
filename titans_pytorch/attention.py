"""Local attention shared by every Titans model: segment (block) or sliding-window, causal,
with learned persistent tokens and optional per-segment prefix tokens (MAC's long-term
memory tokens), rotary positions and a key/value cache for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb
from torch import nn


@dataclass
class AttentionCache:
    """Keys and values `(batch, heads, m, dim_head)` a new token may still see, ordered by
    position: the current segment's (block attention) or the last `window - 1` positions'
    (sliding), with the same number of keys at every position (MAC: the token and its
    retrieved memory token)."""

    keys: torch.Tensor
    values: torch.Tensor

    def detach(self):
        return AttentionCache(self.keys.detach(), self.values.detach())


@dataclass
class StaticAttentionCache:
    """The same keys and values in buffers of fixed size, written in place (CUDA-graph decoding,
    `decoding.GraphDecoder`): `(batch, heads, segment_len * r, dim_head)`, `r` keys per position,
    position `p`'s in slot `p % segment_len` (a ring: a slot is rewritten a segment later). Which
    slots a query sees, `attend` works out on the device from the query's position, so one step
    serves every position, however far into its segment or window."""

    keys: torch.Tensor
    values: torch.Tensor

    def detach(self):
        return StaticAttentionCache(self.keys.detach(), self.values.detach())


def segment_pieces(position: int, length: int, segment_len: int):
    """Split tokens `position .. position+length-1` at segment boundaries: yields (start, end)
    offsets into the input, each piece inside one segment."""
    start = 0
    while start < length:
        absolute = position + start
        end = min(length, start + segment_len - absolute % segment_len)
        yield start, end
        start = end


def split_pieces(pieces, tensor, dim: int):
    """`tensor` cut along `dim` into `pieces` ((start, end) from `segment_pieces`), by one split:
    autograd joins the pieces' gradients once, where a slice per piece would write a full-size
    zero tensor per piece (cost quadratic in the sequence length)."""
    return tensor.split([end - start for start, end in pieces], dim=dim)


class SwiGLU(nn.Module):
    """Pre-RMSNorm SwiGLU feed-forward: `(b, n, dim) -> (b, n, dim)`."""

    def __init__(self, dim: int, mult: float = 4.0):
        super().__init__()
        hidden = int(dim * mult * 2 / 3)
        self.norm = nn.RMSNorm(dim)
        self.proj_in = nn.Linear(dim, hidden * 2, bias=False)
        self.proj_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, value = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(F.silu(gate) * value)


def _shared(masks: dict | None, key, make):
    """`make()`, kept in `masks` under `key` for the rest of the forward, where the layers that ask for
    the same key share it (None: nothing kept)."""
    if masks is None:
        return make()
    value = masks.get(key)
    if value is None:
        value = masks[key] = make()
    return value


class LocalAttention(nn.Module):
    """Causal attention inside a segment (`sliding=False`) or over the last `segment_len`
    tokens (`sliding=True`), each query also seeing `num_persist_mem_tokens` learned tokens
    and any prefix tokens of its segment. Persistent and prefix keys sit at the segment's
    first position for rotary, so what a token sees of them depends only on its offset.

    `attn(x, position, cache) -> (out, cache)` with `x (b, n, dim)` at absolute `position`
    (cache None at the start). A caller that changes the prefix per segment (MAC) uses the
    parts: `q, k, v, normed = attn.project(x, position, masks)`; per piece (see `segment_pieces`)
    `out, cache = attn.attend(q, k, v, position, cache, prefix, masks)`; `attn.to_out(out, normed)`.
    `masks` (both ways) is a dict in which the layers of one model forward share their masks and
    rotary angles.
    """

    def __init__(self, dim, heads=8, dim_head=64, segment_len=128, num_persist_mem_tokens=0, sliding=False,
                 keys_per_position=1):
        super().__init__()
        self.heads, self.dim_head, self.segment_len, self.sliding = heads, dim_head, segment_len, sliding
        self.keys_per_position = keys_per_position  # keys each position adds (MAC with a memory: 2)
        dim_inner = heads * dim_head
        self.norm = nn.RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim_inner, bias=False)
        self.rotary = RotaryEmbedding(dim_head)
        self.persist_mem = nn.Parameter(torch.randn(num_persist_mem_tokens, dim) * 0.02) if num_persist_mem_tokens else None
        # output: a per-head sigmoid gate from the input, then the projection
        self.to_gate = nn.Linear(dim, heads)
        self.to_out_proj = nn.Linear(dim_inner, dim, bias=False)
        # a device scalar added to every position, or None: set while CUDA-graph decoding captures
        # a step, so that the step replays at a later position (decoding.GraphDecoder)
        self.position_offset = None

    def positions(self, start: int, count: int, device):
        """Absolute positions `start .. start + count - 1` `(count,)`, plus the position offset."""
        positions = torch.arange(start, start + count, device=device)
        return positions if self.position_offset is None else positions + self.position_offset

    def _rotate(self, t, positions):
        freqs = self.rotary(positions.to(torch.float32))
        return apply_rotary_emb(freqs, t)

    def _angles(self, position: int, count: int, device, masks=None):
        """The rotary angles of positions `position .. position + count - 1` (the offset included),
        `(count, dim_head)`, shared through `masks` by the layers of one forward (every `LocalAttention`
        rotates alike, with its `RotaryEmbedding(dim_head)`)."""
        key = ("angles", position, count, id(self.position_offset), self.dim_head, device)
        return _shared(masks, key, lambda: self.rotary(self.positions(position, count, device).to(torch.float32)))

    def _split_heads(self, t):
        return rearrange(t, "b n (h d) -> b h n d", h=self.heads)

    def project(self, x, position: int, masks=None):
        """x `(b, n, dim)` at absolute `position` -> rotated q, k and v `(b, h, n, d)`, and the
        normed input (for the output gate). `masks`: as in `attend` (the rotary angles are shared too)."""
        normed = self.norm(x)
        qk, v = self.to_qkv(normed).split([2 * self.heads * self.dim_head, self.heads * self.dim_head], dim=-1)
        # the queries' and keys' heads side by side: one rotation for both
        qk = rearrange(qk, "b n (h d) -> b h n d", h=2 * self.heads)
        q, k = apply_rotary_emb(self._angles(position, x.shape[1], x.device, masks), qk).chunk(2, dim=1)
        return q, k, self._split_heads(v), normed

    def keys_values(self, tokens, positions):
        """Extra tokens `(b, m, dim)` attention should see -> keys (rotated at `positions (m,)`, from
        `positions()`: the offset included) and values, `(b, h, m, d)`. Only the key and value rows
        of `to_qkv` are applied."""
        k, v = self._project_keys_values(tokens)
        return self._rotate(k, positions), v

    def _project_keys_values(self, tokens):
        """tokens `(b, m, dim)` -> unrotated keys and values `(b, h, m, d)` (the key and value rows of `to_qkv`)."""
        key_value_weight = self.to_qkv.weight[self.heads * self.dim_head :]
        return map(self._split_heads, F.linear(self.norm(tokens), key_value_weight).chunk(2, dim=-1))

    def prefix_keys_values(self, tokens, position: int, batch: int, extra=None, extra_positions=None):
        """Persistent tokens plus `tokens (b, m, dim)` (or None) -> keys, values `(b, h, p, d)`
        rotated at the first position of `position`'s segment (None when there are none).

        With `extra` tokens `(b, e, dim)` at `extra_positions (e,)` (from `positions()`), their keys
        and values come out of the same projection: returns `(prefix, (keys, values) of extra)`."""
        parts = []
        if self.persist_mem is not None:
            parts.append(self.persist_mem.expand(batch, -1, -1))
        if tokens is not None:
            parts.append(tokens)
        if not parts:
            return None if extra is None else (None, self.keys_values(extra, extra_positions))
        count, device = sum(part.shape[1] for part in parts), parts[0].device
        positions = self._segment_starts(position, 1, device).expand(count)
        if extra is None:
            return self.keys_values(torch.cat([part.to(parts[-1].dtype) for part in parts], dim=1), positions)
        sizes = [positions.shape[0], extra.shape[1]]
        keys, values = self.keys_values(torch.cat([part.to(extra.dtype) for part in (*parts, extra)], dim=1),
                                        torch.cat((positions, extra_positions)))
        (prefix_keys, extra_keys), (prefix_values, extra_values) = keys.split(sizes, dim=2), values.split(sizes, dim=2)
        return (prefix_keys, prefix_values), (extra_keys, extra_values)

    def _segment_starts(self, position: int, segments: int, device):
        """The first positions of `segments` consecutive segments, from `position`'s on, `(segments,)`,
        the offset included (then worked out on the device, where the position is)."""
        length = self.segment_len
        if self.position_offset is None:
            start = position - position % length
            return torch.arange(start, start + segments * length, length, device=device)
        here = self.positions(position, 1, device)
        return torch.arange(0, segments * length, length, device=device) + (here - here % length)

    def persistent_prefixes(self, position: int, pieces, batch: int):
        """The persistent tokens' keys and values for each of `pieces` (`segment_pieces` of a call at
        `position`: consecutive segments), rotated at its segment's first position, as
        `prefix_keys_values(None, ...)` gives them: a list of `(keys, values)` `(b, h, p, d)` (None
        without persistent tokens), from one projection and one rotation, not one per piece."""
        if self.persist_mem is None:
            return [None] * len(pieces)
        count = self.persist_mem.shape[0]
        keys, values = self._project_keys_values(self.persist_mem[None])  # (1, h, p, d)
        starts = self._segment_starts(position, len(pieces), self.persist_mem.device)
        rotated = self._rotate(keys.repeat(1, 1, len(pieces), 1), starts[:, None].expand(-1, count).reshape(-1))
        values = values.expand(batch, -1, -1, -1)
        return [(piece_keys.expand(batch, -1, -1, -1), values) for piece_keys in rotated.split(count, dim=2)]

    def empty_cache(self, batch, device, dtype):
        shape = (batch, self.heads, 0, self.dim_head)
        empty = torch.zeros(shape, device=device, dtype=dtype)
        return AttentionCache(empty, empty)

    def _slot_index(self, positions, per_position: int):
        """Where the keys of `positions (m,)` lie in a `StaticAttentionCache`, in position order `(m r,)`."""
        index = (positions % self.segment_len)[:, None] * per_position
        return (index + torch.arange(per_position, device=positions.device)).flatten()

    def _check_slots(self, cache: StaticAttentionCache, per_position: int):
        if cache.keys.shape[2] != self.segment_len * per_position:
            raise ValueError(f"a StaticAttentionCache of {cache.keys.shape[2]} slots, not segment_len "
                             f"({self.segment_len}) x {per_position} keys per position")

    def static_cache(self, cache: AttentionCache, position: int) -> StaticAttentionCache:
        """`cache`, continuing at `position`, in fixed-size buffers (`StaticAttentionCache`)."""
        batch, heads, cached, dim_head = cache.keys.shape
        per_position = self.keys_per_position
        keys = cache.keys.new_zeros(batch, heads, self.segment_len * per_position, dim_head)
        values = cache.values.new_zeros(batch, heads, self.segment_len * per_position, dim_head)
        index = self._slot_index(torch.arange(position - cached // per_position, position, device=keys.device), per_position)
        keys.index_copy_(2, index, cache.keys)
        values.index_copy_(2, index, cache.values)
        return StaticAttentionCache(keys, values)

    def growing_cache(self, cache: StaticAttentionCache, position: int, per_position: int) -> AttentionCache:
        """The keys and values of a `StaticAttentionCache` that a query at `position` may see, in
        position order: the `AttentionCache` eager attention continues."""
        self._check_slots(cache, per_position)
        context = min(position, self.segment_len - 1) if self.sliding else position % self.segment_len
        index = self._slot_index(torch.arange(position - context, position, device=cache.keys.device), per_position)
        return AttentionCache(cache.keys.index_select(2, index), cache.values.index_select(2, index))

    def _attend_static(self, q, k, v, position: int, cache: StaticAttentionCache, prefix, masks=None):
        """`attend` for one query on a `StaticAttentionCache`: its keys written to their slots in
        place, the slots it sees worked out from its position on the device (the same kernels at
        every position)."""
        per_position, device = k.shape[2], q.device
        self._check_slots(cache, per_position)
        prefix_len = 0 if prefix is None else prefix[0].shape[2]
        # the slots this step writes and its mask depend on the position and the sizes only: worked
        # out once per forward (`masks`) for all the layers alike
        key = ("static", position, id(self.position_offset), self.segment_len, self.sliding, per_position, prefix_len,
               q.dtype, device)
        index, mask = _shared(masks, key, lambda: self._static_slots_and_mask(position, per_position, prefix_len,
                                                                              q.dtype, device))
        cache.keys.index_copy_(2, index, k.to(cache.keys.dtype))
        cache.values.index_copy_(2, index, v.to(cache.values.dtype))
        keys, values = cache.keys, cache.values
        if prefix is not None:
            keys = torch.cat((prefix[0], keys), dim=2)
            values = torch.cat((prefix[1], values), dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask), cache

    def _static_slots_and_mask(self, position: int, per_position: int, prefix_len: int, dtype, device):
        """For `_attend_static`'s query at `position` (the offset included, on the device): the slots its
        keys go to `(per_position,)` and its additive mask `(1, prefix_len + segment_len * per_position)`.
        Slot s holds the latest position at or before the query's that is s modulo segment_len; it is
        seen once written and, in block attention, within the query's segment."""
        here = self.positions(position, 1, device)  # (1,)
        slots = torch.arange(self.segment_len, device=device)
        key_pos = here - (here - slots) % self.segment_len
        hidden = key_pos < 0  # not written yet (a window not yet full)
        if not self.sliding:
            hidden |= slots > here % self.segment_len  # the previous segment's
        hidden = F.pad(hidden[:, None].expand(-1, per_position).reshape(1, -1), (prefix_len, 0), value=False)
        mask = torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))
        return self._slot_index(here, per_position), mask

    def _mask(self, position, n, context, per_position, prefix_len, dtype, device):
        """`attend`'s additive mask `(n, prefix_len + (context + n) * per_position)`: 0 where a query at
        `position ..` sees a key (the prefix, its segment's or window's earlier positions), -inf elsewhere."""
        query_pos = torch.arange(position, position + n, device=device)
        key_pos = torch.arange(position - context, position + n, device=device).repeat_interleave(per_position)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if self.sliding:
            allowed &= key_pos[None, :] > query_pos[:, None] - self.segment_len
        else:
            allowed &= key_pos[None, :] >= (query_pos - query_pos % self.segment_len)[:, None]
        if prefix_len:
            allowed = torch.cat((allowed.new_ones(n, prefix_len), allowed), dim=1)
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def attend(self, q, k, v, position: int, cache: AttentionCache | StaticAttentionCache, prefix=None, masks=None):
        """One piece inside one segment: q `(b, h, n, d)` at absolute positions `position ..
        position + n - 1`; new keys/values `(b, h, r * n, d)`, `r` per position, ordered by
        position (r = 1: the queries' own). Each query sees the prefix and the keys at
        positions up to its own within its segment (block) or window (sliding). Returns the
        attention output `(b, h, n, d)` and the updated cache (a `StaticAttentionCache` is
        written in place and returned). `masks`: a dict the caller keeps for one forward, in which
        its pieces, and the attention layers it runs, share their masks (and on a static cache the
        slots a step writes), keyed by what they depend on (None: none kept)."""
        if isinstance(cache, StaticAttentionCache):
            if q.shape[2] == 1:
                return self._attend_static(q, k, v, position, cache, prefix, masks)
            cache = self.growing_cache(cache, position, k.shape[2] // q.shape[2])  # a longer piece: as before
        n = q.shape[2]
        per_position = k.shape[2] // n
        context = cache.keys.shape[2] // per_position  # cached positions, the ones just before `position`
        if context:
            seq_keys, seq_values = torch.cat((cache.keys, k), dim=2), torch.cat((cache.values, v), dim=2)
        else:  # nothing cached (a segment's first piece): no copy, but the dtype a concatenation would give
            dtype = torch.promote_types(cache.keys.dtype, k.dtype)
            seq_keys, seq_values = k.to(dtype), v.to(dtype)
        keys, values = seq_keys, seq_values
        if prefix is not None:
            keys = torch.cat((prefix[0], keys), dim=2)
            values = torch.cat((prefix[1], values), dim=2)
        # the mask depends on the piece's place in its segment and the sizes only: built once per forward
        # (`masks`, the caller's, lives as long as the forward), as the additive mask SDPA would make of it
        prefix_len = 0 if prefix is None else prefix[0].shape[2]
        key = ("growing", position % self.segment_len, self.segment_len, self.sliding, n, context, per_position,
               prefix_len, q.dtype, q.device)
        mask = _shared(masks, key, lambda: self._mask(position, n, context, per_position, prefix_len, q.dtype, q.device))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

        # keep what the next token may see: the current segment's positions, or the last window - 1
        end = position + n
        keep = min(self.segment_len - 1 if self.sliding else end % self.segment_len, context + n) * per_position
        start = seq_keys.shape[2] - keep
        kept_keys, kept_values = seq_keys[:, :, start:], seq_values[:, :, start:]
        if keep and not context:  # views of the call's projections (all its queries, keys and values): copied out
            kept_keys, kept_values = kept_keys.contiguous(), kept_values.contiguous()
        return out, AttentionCache(kept_keys, kept_values)

    def to_out(self, out, x_normed):
        gate = torch.sigmoid(self.to_gate(x_normed))
        out = out * rearrange(gate, "b n h -> b h n 1")
        return self.to_out_proj(rearrange(out, "b h n d -> b n (h d)"))

    def forward(self, x, position: int, cache: AttentionCache | None = None, masks: dict | None = None):
        """x `(b, n, dim)` at absolute `position` -> `(out (b, n, dim), cache)`; each query sees
        the persistent tokens and its segment's (or window's) earlier tokens. `masks`: as in `attend`
        (None: kept for this call)."""
        batch, length = x.shape[:2]
        cache = cache if cache is not None else self.empty_cache(batch, x.device, x.dtype)
        masks = {} if masks is None else masks
        q, k, v, normed = self.project(x, position, masks)
        pieces = list(segment_pieces(position, length, self.segment_len))
        q, k, v = (split_pieces(pieces, t, dim=2) for t in (q, k, v))
        prefixes = self.persistent_prefixes(position, pieces, batch)
        outputs = []
        for index, (start, _) in enumerate(pieces):
            out, cache = self.attend(q[index], k[index], v[index], position + start, cache, prefixes[index], masks)
            outputs.append(out)
        return self.to_out(torch.cat(outputs, dim=2), normed), cache
