"""Memory as a Layer (MAL), section 4.3 of the paper."""

from __future__ import annotations

from torch import nn

from .attention import LocalAttention
from .neural_memory import NeuralMemory
from .transformer import MixerCache, SlidingWindowMemoryTransformer


class MemoryAsLayerMixer(nn.Module):
    """The neural memory layer, then sliding-window attention on its output, each with a
    residual: `h = x + M(x)`, `x + out = h + Attn([persistent || h])`. Without a memory it
    is the attention alone. `x (b, n, dim) -> (b, n, dim)`.
    """

    def __init__(self, attention: LocalAttention, memory: NeuralMemory | None):
        super().__init__()
        self.attention, self.memory = attention, memory

    def forward(self, x, position: int, cache: MixerCache | None = None, masks: dict | None = None):
        cache = cache if cache is not None else MixerCache()
        if self.memory is None:
            y, attention_cache = self.attention(x, position, cache.attention, masks)
            return y, MixerCache(attention_cache)
        read, memory_state = self.memory(x, state=cache.memory, return_state=True)
        y, attention_cache = self.attention(x + read, position, cache.attention, masks)
        return read + y, MixerCache(attention_cache, memory_state)


class MemoryAsLayerTransformer(SlidingWindowMemoryTransformer):
    """Titans MAL language model: in every layer the neural memory, then sliding-window
    attention (window `segment_len`) over its output (layers left out of
    `neural_memory_layers` use the attention alone). `model(ids)` with `ids (batch, seq)`
    -> logits `(batch, seq, num_tokens)`; arguments, `return_loss`, caching and `sample`
    as in `MemoryAsContextTransformer`.
    """

    mixer_class = MemoryAsLayerMixer
