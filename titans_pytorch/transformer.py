"""The language-model shell shared by every Titans variant (MAC, MAG, MAL, LMM).

Token embedding, `depth` blocks of (sequence mixer, SwiGLU feed-forward) joined by
hyper-connections (`num_residual_streams = 1` turns them into plain residuals), a final
RMSNorm and the logits. A variant only supplies its sequence mixer: a module called as
`mixer(x, position, cache, masks) -> (out, cache)` on `x (batch, n, dim)` starting at absolute
`position`, whose cache (None at the start) holds whatever it needs to continue; `masks` is a dict
in which the attention layers of one forward share their masks (`LocalAttention.attend`).
Because the same code runs a whole sequence and a single new token, cached decoding and
the uncached forward agree by construction (and the tests check it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hyper_connections import get_init_and_expand_reduce_stream_functions
from torch import nn
from tqdm.auto import tqdm
from x_transformers.autoregressive_wrapper import FILTER_LOGITS_FN

from .attention import LocalAttention, SwiGLU
from .checks import check_non_negative_ints, check_positive_ints
from .decoding import MAX_GRAPHED_PERIOD, GraphDecoder
from .neural_memory import NeuralMemory
from .pretrained import PretrainedMixin
from .streams import FusedHyperConnections


@dataclass
class TransformerCache:
    """Decoding state: `position` (tokens seen so far) and one cache per layer's mixer
    (attention keys/values within the window, the neural memory's state, ...)."""

    position: int
    layers: list

    def detach(self) -> "TransformerCache":
        return TransformerCache(self.position, [c.detach() if c is not None else None for c in self.layers])


@dataclass
class MixerCache:
    """A mixer's cache: attention keys/values (`AttentionCache` or None), the neural memory's
    state (`NeuralMemoryState` or None), the current segment's prefix keys/values and the
    memory's state at the segment's start (MAC)."""

    attention: object = None
    memory: object = None
    prefix: tuple | None = None
    segment_memory: object = None

    def detach(self) -> "MixerCache":
        return MixerCache(
            self.attention.detach() if self.attention is not None else None,
            self.memory.detach() if self.memory is not None else None,
            tuple(t.detach() for t in self.prefix) if self.prefix is not None else None,
            self.segment_memory.detach() if self.segment_memory is not None else None,
        )


def build_memories(depth, dim, neural_memory_layers, neural_memory_kwargs, neural_memory_model, segment_len=None):
    """One `NeuralMemory` per layer listed in `neural_memory_layers` (1-indexed; None: all
    layers), else None. `neural_memory_model` is deep-copied so layers do not share it."""
    layers = tuple(range(1, depth + 1)) if neural_memory_layers is None else tuple(neural_memory_layers)
    bad = [layer for layer in layers if not isinstance(layer, int) or not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"neural_memory_layers must be layer numbers in 1..{depth}, got {bad}")
    kwargs = dict(neural_memory_kwargs or {})
    kwargs.setdefault("chunk_size", min(16, segment_len) if segment_len else 16)
    if segment_len is not None and segment_len % kwargs["chunk_size"] != 0:
        raise ValueError(
            f"segment_len ({segment_len}) must be a multiple of the neural memory's chunk_size ({kwargs['chunk_size']})"
        )
    memories = []
    for layer in range(1, depth + 1):
        if layer not in layers:
            memories.append(None)
            continue
        model = copy.deepcopy(neural_memory_model) if neural_memory_model is not None else None
        memories.append(NeuralMemory(dim, model=model, **kwargs))
    return memories


def _hyper_connection(init_hyper_conn, num_residual_streams, dim, layer_index):
    """The connection around one branch: the library's plain residual for one stream, else its
    hyper-connection computed in fewer passes (`streams.FusedHyperConnections`, same parameters)."""
    if num_residual_streams == 1:
        return init_hyper_conn(dim=dim, layer_index=layer_index)
    return FusedHyperConnections(num_residual_streams, dim=dim, layer_index=layer_index)


class MemoryGate(nn.Module):
    """The paper's non-linear gate `y (x) M(x)` (MAG's combination, MAC's gated read): the
    attention output `y` and the memory's read `m`, both `(b, n, dim)`, each normalised with
    learned scales, the attention gating the read: `sigmoid(RMSNorm(y)) * RMSNorm(m)`.

    The paper does not say which side takes the sigmoid. With it on the memory's side, what
    the memory recalls reaches the output only as a modulation of attention, and MAG and MAC
    learned recall several times more slowly (docs/recall.md)."""

    def __init__(self, dim: int):
        super().__init__()
        self.attention_norm, self.memory_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)

    def forward(self, y, read):
        return torch.sigmoid(self.attention_norm(y)) * self.memory_norm(read)


class TitansTransformer(PretrainedMixin, nn.Module):
    """`model(ids)` with `ids (batch, seq)` of token ids -> logits `(batch, seq, num_tokens)`.

    `model(ids, return_loss=True)` -> next-token cross-entropy of `ids[:, 1:]` given
    `ids[:, :-1]`. `model(ids, cache=cache, return_cache=True)` -> `(logits, cache)`.
    `generate` yields new tokens one by one, `sample` returns them at once;
    `save_pretrained` / `from_pretrained` (`PretrainedMixin`) save and rebuild a subclass
    from its constructor arguments and weights.
    """

    def __init__(self, num_tokens: int, dim: int, mixers, ff_mult: float = 4.0, num_residual_streams: int = 4):
        super().__init__()
        check_positive_ints(num_tokens=num_tokens, dim=dim, num_residual_streams=num_residual_streams)
        self.num_tokens, self.dim = num_tokens, dim
        self.token_emb = nn.Embedding(num_tokens, dim)
        init_hyper_conn, self.expand_streams, self.reduce_streams = get_init_and_expand_reduce_stream_functions(
            num_residual_streams, dim=dim, disable=num_residual_streams == 1
        )
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    _hyper_connection(init_hyper_conn, num_residual_streams, dim, 2 * index),
                    mixer,
                    _hyper_connection(init_hyper_conn, num_residual_streams, dim, 2 * index + 1),
                    SwiGLU(dim, ff_mult),
                ]
            )
            for index, mixer in enumerate(mixers)
        )
        self.norm = nn.RMSNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens, bias=False)

    def _check_ids(self, ids, name="ids"):
        if not torch.is_tensor(ids) or ids.dtype not in (torch.long, torch.int, torch.int16, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor of token ids (batch, seq), got {getattr(ids, 'dtype', type(ids))}")
        if ids.ndim != 2:
            raise ValueError(f"{name} must have shape (batch, seq), got {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_tokens):
            raise ValueError(
                f"{name} must lie in [0, {self.num_tokens}), got values in [{ids.min().item()}, {ids.max().item()}]"
            )

    def forward(self, ids, return_loss: bool = False, cache: TransformerCache | None = None, return_cache: bool = False):
        self._check_ids(ids)
        if return_loss:
            if ids.shape[1] < 2:
                raise ValueError(f"return_loss needs at least 2 tokens per sequence, got {ids.shape[1]}")
        if cache is not None and not isinstance(cache, TransformerCache):
            raise TypeError(f"cache must be a TransformerCache or None, got {type(cache).__name__}")
        if return_loss:
            return self._loss(ids, cache)
        logits, cache = self._decode(ids, cache)
        return (logits, cache) if return_cache else logits

    def _loss(self, ids, cache: TransformerCache | None = None):
        """Next-token cross-entropy of `ids[:, 1:]` given `ids[:, :-1]` (continuing `cache`), without
        the forward's checks."""
        logits, _ = self._decode(ids[:, :-1], cache)
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].long())

    def _decode(self, ids, cache: TransformerCache | None):
        """The forward without its checks: ids `(batch, n)` continuing `cache` (None: from the start)
        -> `(logits, cache)`."""
        position = cache.position if cache is not None else 0
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        # the residual streams as the hyper-connections library lays them out, `(b s) ... d`, with
        # every position in the batch dimension: `(batch length streams, 1, dim)`. They are position-wise,
        # so this is the same computation, but a position's streams lie side by side and the library's
        # ops run on contiguous tensors (in `(b s) n d` its streams are strided, and its einsums copy
        # them). The mixers and feed-forwards see `(batch, length, dim)`.
        batch, length = ids.shape
        tokens = lambda t: t.reshape(batch * length, 1, self.dim)  # noqa: E731
        sequence = lambda t: t.view(batch, length, self.dim)  # noqa: E731
        x = self.expand_streams(tokens(self.token_emb(ids.long())))
        new_caches, masks = [], {}  # every layer attends at the same positions: one mask per layout for all of them
        for (mix_connection, mixer, ff_connection, feed_forward), layer_cache in zip(self.layers, layer_caches):
            branch_input, add_residual = mix_connection(x)
            out, layer_cache = mixer(sequence(branch_input), position, layer_cache, masks)
            x = add_residual(tokens(out))
            branch_input, add_residual = ff_connection(x)
            x = add_residual(tokens(feed_forward(sequence(branch_input))))
            new_caches.append(layer_cache)
        logits = self.to_logits(self.norm(sequence(self.reduce_streams(x))))
        return logits, TransformerCache(position + ids.shape[1], new_caches)

    def generate(
        self,
        prompt,
        num_new_tokens: int,
        temperature: float = 1.0,
        filter_fn="min_p",
        filter_kwargs: dict | None = None,
        use_cache: bool = True,
        cuda_graphs: bool = True,
    ):
        """Continue `prompt (batch, prompt_len)` by `num_new_tokens` tokens, yielding each new
        token `(batch, 1)` as soon as it is drawn. `filter_fn`: "min_p" (default), "top_k",
        "top_p", "top_a" (x-transformers' filters, `filter_kwargs` their arguments) or a
        callable on logits; temperature 0 is greedy. Arguments are checked at the call; the
        model is in eval mode until the generator finishes or is closed.

        On CUDA, with `use_cache` and `cuda_graphs`, the one-token steps are replayed from CUDA
        graphs (`decoding.GraphDecoder`: one per offset in the memories' chunks, and one for a MAC
        segment's start, each captured when it first comes up) once at least two chunks of tokens
        are to come, for chunks of up to `decoding.MAX_GRAPHED_PERIOD` tokens."""
        self._check_ids(prompt, "prompt")
        if prompt.shape[1] == 0:
            raise ValueError("prompt must hold at least one token")
        check_non_negative_ints(num_new_tokens=num_new_tokens)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if isinstance(filter_fn, str):
            if filter_fn not in FILTER_LOGITS_FN:
                raise ValueError(f"filter_fn must be one of {sorted(FILTER_LOGITS_FN)} or a callable, got {filter_fn!r}")
            filter_fn = FILTER_LOGITS_FN[filter_fn]
        decoder = self._graph_decoder(prompt, num_new_tokens) if use_cache and cuda_graphs else None
        return self._generated_tokens(prompt.long(), num_new_tokens, temperature, filter_fn, filter_kwargs or {},
                                      use_cache, decoder)

    def _graph_decoder(self, prompt, num_new_tokens):
        """The CUDA-graph decoder for this generation, or None: not on CUDA, too short to pay for its
        captures, or memory chunks beyond `MAX_GRAPHED_PERIOD` tokens."""
        if prompt.device.type != "cuda":
            return None
        decoder = GraphDecoder(self)
        if decoder.period > MAX_GRAPHED_PERIOD or num_new_tokens - 1 < 2 * decoder.period:
            return None
        return decoder

    @torch.no_grad()
    def _generated_tokens(self, prompt, num_new_tokens, temperature, filter_fn, filter_kwargs, use_cache, decoder=None):
        was_training = self.training
        self.eval()
        try:
            sequence, new, cache = prompt, prompt, None  # new: what the cache has not seen yet
            for _ in range(num_new_tokens):
                if decoder is not None and cache is not None:  # one-token steps (decoder: with use_cache)
                    logits, cache = decoder(new, cache)
                elif use_cache:
                    logits, cache = self(new, cache=cache, return_cache=True)
                else:
                    logits = self(sequence)
                last = logits[:, -1].float()
                if temperature == 0:
                    new = last.argmax(dim=-1, keepdim=True)
                else:
                    probs = F.softmax(filter_fn(last, **filter_kwargs) / temperature, dim=-1)
                    new = torch.multinomial(probs, 1)
                if not use_cache:
                    sequence = torch.cat((sequence, new), dim=1)
                yield new
        finally:
            self.train(was_training)

    def sample(
        self,
        prompt,
        seq_len: int,
        temperature: float = 1.0,
        filter_fn="min_p",
        filter_kwargs: dict | None = None,
        use_cache: bool = True,
        show_progress: bool = False,
        cuda_graphs: bool = True,
    ):
        """Continue `prompt (batch, prompt_len)` until it is `seq_len` long; returns the
        `seq_len - prompt_len` new tokens `(batch, seq_len - prompt_len)`, drawn by `generate`
        (same arguments)."""
        self._check_ids(prompt, "prompt")
        prompt_len = prompt.shape[1]
        if not isinstance(seq_len, int) or seq_len < prompt_len:
            raise ValueError(f"seq_len ({seq_len}) must be an integer >= the prompt length ({prompt_len})")
        tokens = self.generate(prompt, seq_len - prompt_len, temperature, filter_fn, filter_kwargs, use_cache, cuda_graphs)
        new = list(tqdm(tokens, total=seq_len - prompt_len, disable=not show_progress, desc="sampling"))
        return torch.cat(new, dim=1) if new else prompt.new_zeros((prompt.shape[0], 0), dtype=torch.long)


class SlidingWindowMemoryTransformer(TitansTransformer):
    """Shared constructor of the variants whose attention is a sliding window next to or
    after the memory (MAG, MAL). A subclass names its `mixer_class`, built per layer as
    `mixer_class(attention, memory)` with `memory` None on layers without one.

    `segment_len`: the attention window (each token sees itself and the `segment_len - 1`
    before it, plus `num_persist_mem_tokens` learned tokens). The other arguments are those
    of `MemoryAsContextTransformer`; the memory's chunk defaults to 16.
    """

    mixer_class: type

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        segment_len: int,
        num_persist_mem_tokens: int = 0,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: float = 4.0,
        neural_memory_layers=None,
        neural_memory_kwargs: dict | None = None,
        neural_memory_model: nn.Module | None = None,
        num_residual_streams: int = 4,
    ):
        check_positive_ints(dim=dim, depth=depth, segment_len=segment_len, heads=heads, dim_head=dim_head)
        check_non_negative_ints(num_persist_mem_tokens=num_persist_mem_tokens)
        memories = build_memories(depth, dim, neural_memory_layers, neural_memory_kwargs, neural_memory_model)
        mixers = [
            self.mixer_class(LocalAttention(dim, heads, dim_head, segment_len, num_persist_mem_tokens, sliding=True), memory)
            for memory in memories
        ]
        super().__init__(num_tokens, dim, mixers, ff_mult, num_residual_streams)
        self.segment_len = segment_len
