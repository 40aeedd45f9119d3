"""Cached one-token decoding replayed from CUDA graphs (`GraphDecoder`), which `generate` uses on CUDA.

A CUDA graph replays the kernels it captured on the buffers it captured, with every value the host
worked out baked in. So the decoder keeps the attention caches in buffers of fixed size
(`attention.StaticAttentionCache`: a segment's or window's slots, position `p`'s keys in slot
`p % segment_len`, written in place), and the one host value that moves from step to step, the
position, lives on the device: while a graph is captured, `LocalAttention.position_offset` points at
a device scalar that every position adds, and before each replay it holds the replayed position
minus the captured one. Rotary angles, the slot a step writes, the slots its query sees and a
segment's start are worked out from it on the device.

What is left on the host depends on the position only through the step's kind: its offset in the
memories' chunks (how many tokens are pending, when a chunk is complete and written) and whether a
MAC segment starts there (its new prefix and long-term reads). One graph per kind, captured the
first time the kind comes up, replays every later step of that kind: the paper's configuration
(chunks of 16, segments of 512) decodes from 17 graphs.

A graph's outputs (the logits and the next cache) are its static buffers, and the graph of the next
step is captured on them as its inputs, so the cache moves from graph to graph without a copy; where
a step follows another graph than the one its graph was captured after (a period wraps around, a
segment ends), the cache is copied into its input buffers, by a plan worked out once per pair of
graphs (`cuda_graphs.copy_plan`). The attention buffers are the same tensors in every graph. Each
graph has a memory pool of its own: a graph's outputs (the memory's weights after a chunk's write,
MAC's prefix at a segment's start) stay in use for many later steps, and in a shared pool a graph
captured earlier could reuse their memory for its temporaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from .attention import AttentionCache, LocalAttention
from .cuda_graphs import (
    autocast_without_cache, cache_structure, capture_cuda_graph, copy_leaves, copy_plan, distinct_leaves, map_tensors,
    run_copy_plan, warm_up,
)
from .neural_memory import NeuralMemory


# `generate` replays graphs for memory chunks of up to this many tokens (one graph per offset)
MAX_GRAPHED_PERIOD = 128


def decoding_period(model) -> int:
    """The least common multiple of `model`'s memory chunk sizes: 1 without a memory. (`refresh_every`
    plays no part: a one-token step completes one chunk at most, and a call's refresh spans start
    with the call.)"""
    period = 1
    for module in model.modules():
        if isinstance(module, NeuralMemory):
            period = math.lcm(period, module.chunk_size)
    return period


def segment_lengths(model) -> list:
    """The segment lengths at whose starts a mixer of `model` does host work of its own: those of
    the mixers with a `segment_len` (MAC: the new prefix and long-term reads). Attention alone has
    none (a sliding window, or a block's start, is the mask's business, on the device)."""
    return sorted({mixer.segment_len for _, mixer, _, _ in model.layers if hasattr(mixer, "segment_len")})


def static_caches(model, cache):
    """`cache` (a `TransformerCache` of `model`) with every attention cache in fixed-size buffers
    (`StaticAttentionCache`); the rest is the same."""
    layers = []
    for (_, mixer, _, _), layer in zip(model.layers, cache.layers):
        if layer is not None and isinstance(layer.attention, AttentionCache):
            layer = dataclasses.replace(layer, attention=mixer.attention.static_cache(layer.attention, cache.position))
        layers.append(layer)
    return type(cache)(cache.position, layers)


@contextlib.contextmanager
def rotary_offset(model, offset):
    """Every `LocalAttention` of `model` adds the device scalar `offset` to its positions."""
    attentions = [m for m in model.modules() if isinstance(m, LocalAttention)]
    for attention in attentions:
        attention.position_offset = offset
    try:
        yield
    finally:
        for attention in attentions:
            attention.position_offset = None


@dataclasses.dataclass
class _Graph:
    ids: torch.Tensor  # static input: the new token ids (batch, 1)
    cache: object  # static input: the cache's layers
    position: int  # the position captured
    logits: torch.Tensor  # static outputs
    next_cache: object
    replay: object


class GraphDecoder:
    """`decoder(ids, cache) -> (logits, cache)`: `model(ids, cache=cache, return_cache=True)` for one
    new token `ids (batch, 1)` on CUDA, replayed from one CUDA graph per kind of step (its offset in
    the memories' period, whether a segment starts: `step_kind`), captured the first time the kind
    comes up, after a warm-up run. The ids are not range-checked (the check reads them back to the
    host). The caches it returns hold their attention in `StaticAttentionCache`s, written in place,
    and the logits and caches are its graphs' output buffers: read the logits before the next call,
    and pass each cache back once, to the next call (a cache from the eager forward may start a run
    at any time). The memories' `NeuralMemoryState.position` in them is not kept up to date.
    `capture` is `capture_cuda_graph` (the CPU tests pass `rerun_eagerly`)."""

    def __init__(self, model, capture=capture_cuda_graph):
        self.model, self.capture = model, capture
        self.period, self.segment_lens = decoding_period(model), segment_lengths(model)
        self.graphs: dict = {}
        self.structures: dict = {}  # id of a graph's output cache -> its structure, known once captured
        self.plans: dict = {}  # (id of a graph's output cache, id of the next graph) -> the copy between
        self.offset = None

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def step_kind(self, position: int):
        """What a step at `position` does on the host depends on: its offset in the memories' period,
        and at which of the mixers' segment lengths (`segment_lengths`) a segment starts there."""
        return position % self.period, tuple(position % length == 0 for length in self.segment_lens)

    def __call__(self, ids, cache):
        if ids.shape[1] != 1:
            raise ValueError(f"ids must be one new token per sequence (batch, 1), got {tuple(ids.shape)}")
        structure = self.structures.get(id(cache.layers))  # no walk of the cache for a graph's own output
        from_graph = structure is not None
        if not from_graph:  # its attention into fixed-size buffers first
            cache = static_caches(self.model, cache)
            structure = cache_structure(cache.layers)
        key = (self.step_kind(cache.position), structure, tuple(ids.shape), ids.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(ids, cache)
            self.structures[id(graph.next_cache)] = cache_structure(graph.next_cache)
        if graph.cache is not cache.layers:
            if from_graph:  # a graph's output buffers: the same copy every time
                plan = self.plans.get((id(cache.layers), id(graph)))
                if plan is None:
                    plan = self.plans[id(cache.layers), id(graph)] = copy_plan(cache.layers, graph.cache)
                run_copy_plan(plan)
            else:
                copy_leaves(cache.layers, graph.cache)
        graph.ids.copy_(ids)
        self.offset.fill_(cache.position - graph.position)
        graph.replay()
        return graph.logits, type(cache)(cache.position + ids.shape[1], graph.next_cache)

    def _capture(self, ids, cache):
        device = ids.device
        if self.offset is None:
            self.offset = torch.zeros((), dtype=torch.long, device=device)
        # a cache that another graph wrote is that graph's output buffers: capture on them (no copy
        # between the two), but for a tensor held at two places, cloned at the second, so that a cache
        # coming from another graph can be copied in; any other cache is cloned into buffers of its own
        if any(cache.layers is graph.next_cache for graph in self.graphs.values()):
            inputs = distinct_leaves(cache.layers)
        else:
            inputs = map_tensors(cache.layers, torch.clone)
        static_ids = ids.clone()

        def step():  # positions shifted by the offset (read from its buffer when replayed)
            with rotary_offset(self.model, self.offset):
                return self.model._decode(static_ids, type(cache)(cache.position, inputs))

        self.offset.zero_()
        with autocast_without_cache(device.type):
            if device.type == "cuda":
                warm_up(step, device)  # idempotent: it writes this position's keys into their slots
            (logits, next_cache), replay = self.capture(step, None, device)  # a memory pool of its own
        return _Graph(static_ids, inputs, cache.position, logits, next_cache.layers, replay)
