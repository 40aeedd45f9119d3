"""Memory as Gate (MAG), section 4.2 of the paper."""

from __future__ import annotations

from torch import nn

from .attention import LocalAttention
from .neural_memory import NeuralMemory
from .transformer import MemoryGate, MixerCache, SlidingWindowMemoryTransformer


class MemoryAsGateMixer(nn.Module):
    """Two branches over the same input `x (b, n, dim)`: sliding-window attention over
    `[persistent || x]` giving `y`, and the neural memory over `x` giving `m` (each token
    reading the memory before its own chunk is stored, so causal). They are combined by the
    paper's non-linear gate (`MemoryGate`: the attention gates the memory's read, both
    normalised): `out = W_o (sigmoid(RMSNorm(y)) * RMSNorm(m))`. Without a memory it is the
    attention alone.
    """

    def __init__(self, attention: LocalAttention, memory: NeuralMemory | None):
        super().__init__()
        self.attention, self.memory = attention, memory
        if memory is not None:
            self.gate = MemoryGate(memory.dim)
            self.to_out = nn.Linear(memory.dim, memory.dim, bias=False)

    def forward(self, x, position: int, cache: MixerCache | None = None, masks: dict | None = None):
        cache = cache if cache is not None else MixerCache()
        y, attention_cache = self.attention(x, position, cache.attention, masks)
        if self.memory is None:
            return y, MixerCache(attention_cache)
        read, memory_state = self.memory(x, state=cache.memory, return_state=True)
        out = self.to_out(self.gate(y, read))
        return out, MixerCache(attention_cache, memory_state)


class MemoryAsGateTransformer(SlidingWindowMemoryTransformer):
    """Titans MAG language model: every layer mixes tokens with sliding-window attention
    (window `segment_len`) gated by a neural memory read of the same input (layers left
    out of `neural_memory_layers` use the attention alone). `model(ids)` with
    `ids (batch, seq)` -> logits `(batch, seq, num_tokens)`; arguments, `return_loss`,
    caching and `sample` as in `MemoryAsContextTransformer`.
    """

    mixer_class = MemoryAsGateMixer
