"""Cached one-token decoding replayed from CUDA graphs (`GraphDecoder`), which `generate` uses on CUDA.

What a cached decoding step does on the host depends on its absolute position only through the
position's offset in a period (the least common multiple of the attention segments and the memory
chunks: where a segment starts, when a chunk is complete and written) and through the shapes of
the cache it continues (keys/values of the segment or window so far, tokens pending in the memory's
chunk). Two steps with the same offset and cache shapes dispatch the same kernels on tensors of the
same shapes, so one CUDA graph per offset replays every later step at that offset: a period of
graphs, captured once, then one graph launch per token instead of a few thousand kernel launches.

The one value a graph would bake that does change between such steps is the rotary position of
the new keys and queries. Attention scores depend on positions only through their differences,
but the cache holds keys rotated at their absolute positions, so the new ones must be too: while a
graph is captured, `LocalAttention.position_offset` points at a device scalar that every rotary
position adds, and before each replay it holds the replayed position minus the captured one.

A graph's outputs (the logits and the next cache) are its static buffers, and the next graph is
captured on them as its inputs, so the cache moves from one graph to the next without a copy; only
where a period wraps around (and for the first step, coming from the eager prompt) is a cache
copied into a graph's input buffers. Graphs share one memory pool and are replayed in the order
they were captured, the pattern `torch.cuda.graph`'s pool sharing is safe for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from .attention import LocalAttention
from .cuda_graphs import autocast_without_cache, cache_structure, capture_cuda_graph, copy_leaves, map_tensors, warm_up
from .neural_memory import NeuralMemory


# `generate` replays graphs for periods of up to this many tokens: one graph per offset keeps every
# offset's output cache, and block attention's grows through the segment (the sum over a period of
# 128 is 8K positions per layer; over the paper's 512, 131K)
MAX_GRAPHED_PERIOD = 128


def decoding_period(model) -> int:
    """The least common multiple of `model`'s attention segment lengths and memory chunk sizes (times
    their `refresh_every`)."""
    period = 1
    for module in model.modules():
        if isinstance(module, LocalAttention):
            period = math.lcm(period, module.segment_len)
        elif isinstance(module, NeuralMemory):
            period = math.lcm(period, module.chunk_size * module.refresh_every)
    return period


def decoding_warmup(model) -> int:
    """Tokens after which a cached step's shapes repeat with the period: a sliding window's cache
    grows until it holds `segment_len - 1` positions, and stays that size."""
    return max([m.segment_len for m in model.modules() if isinstance(m, LocalAttention) and m.sliding], default=0)


@contextlib.contextmanager
def rotary_offset(model, offset):
    """Every `LocalAttention` of `model` adds the device scalar `offset` to its rotary positions."""
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
    new token `ids (batch, 1)` on CUDA, replayed from one CUDA graph per offset in the decoding period
    (captured the first time an offset comes up, after a warm-up run). The ids are not range-checked
    (the check reads them back to the host). The logits and caches it returns are its graphs' output
    buffers: read the logits before the next call (the graphs share a memory pool, and another graph's
    temporaries may lie there), and pass each cache back once, to the next call (a cache from the
    eager forward may start a run at any time). The memories' `NeuralMemoryState.position` in them
    is not kept up to date. `capture` is `capture_cuda_graph` (the CPU tests pass `rerun_eagerly`)."""

    def __init__(self, model, capture=capture_cuda_graph):
        self.model, self.capture = model, capture
        self.period, self.warmup = decoding_period(model), decoding_warmup(model)
        self.graphs: dict = {}
        self.structures: dict = {}  # id of a graph's output cache -> its structure, known once captured
        self.offset = None
        self.pool = None  # one memory pool for all the graphs, made with the first

    @property
    def captures(self) -> int:
        return len(self.graphs)

    def replays(self, position: int) -> bool:
        """Whether a step at `position` comes from a graph (the shapes repeat from there on)."""
        return position >= self.warmup

    def __call__(self, ids, cache):
        if not self.replays(cache.position):
            return self.model(ids, cache=cache, return_cache=True)
        structure = self.structures.get(id(cache.layers))  # no walk of the cache for a graph's own output
        if structure is None:
            structure = cache_structure(cache.layers)
        key = (cache.position % self.period, structure, tuple(ids.shape), ids.dtype)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(ids, cache)
            self.structures[id(graph.next_cache)] = cache_structure(graph.next_cache)
        if graph.cache is not cache.layers:
            copy_leaves(cache.layers, graph.cache)
        graph.ids.copy_(ids)
        self.offset.fill_(cache.position - graph.position)
        graph.replay()
        return graph.logits, type(cache)(cache.position + ids.shape[1], graph.next_cache)

    def _capture(self, ids, cache):
        device = ids.device
        if self.offset is None:
            self.offset = torch.zeros((), dtype=torch.long, device=device)
            if self.capture is capture_cuda_graph:
                with torch.cuda.device(device):
                    self.pool = torch.cuda.graph_pool_handle()
        # a cache that another graph wrote is that graph's output buffers: capture on them (no copy
        # between the two); any other is cloned into buffers of this graph's own
        if any(cache.layers is graph.next_cache for graph in self.graphs.values()):
            inputs = cache.layers
        else:
            inputs = map_tensors(cache.layers, torch.clone)
        static_ids = ids.clone()

        def step():  # rotary positions shifted by the offset (read from its buffer when replayed)
            with rotary_offset(self.model, self.offset):
                return self.model._decode(static_ids, type(cache)(cache.position, inputs))

        self.offset.zero_()
        with autocast_without_cache(device.type):
            if device.type == "cuda":
                warm_up(step, device)
            (logits, next_cache), replay = self.capture(step, self.pool, device)
        return _Graph(static_ids, inputs, cache.position, logits, next_cache.layers, replay)
