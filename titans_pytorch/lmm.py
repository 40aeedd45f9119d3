"""The long-term memory alone as the sequence mixer (LMM), section 4.4 of the paper."""

from __future__ import annotations

from torch import nn

from .checks import check_positive_ints
from .neural_memory import NeuralMemory
from .transformer import MixerCache, TitansTransformer, build_memories


class MemoryMixer(nn.Module):
    """The neural memory as a sequence mixer: `x (b, n, dim) -> M(x)`, each token reading
    the memory as it stood before its own chunk (retrieve, then store)."""

    def __init__(self, memory: NeuralMemory):
        super().__init__()
        self.memory = memory

    def forward(self, x, position: int, cache: MixerCache | None = None, masks: dict | None = None):
        state = cache.memory if cache is not None else None  # (masks: there is no attention here)
        out, state = self.memory(x, state=state, return_state=True)
        return out, MixerCache(memory=state)


class MemoryTransformer(TitansTransformer):
    """Titans LMM language model: `depth` blocks of (neural memory, SwiGLU feed-forward),
    no attention. `model(ids)` with `ids (batch, seq)` -> logits `(batch, seq, num_tokens)`;
    `return_loss`, caching and `sample` as in `MemoryAsContextTransformer`.
    `neural_memory_kwargs` go to every layer's `NeuralMemory` (chunk_size defaults to 16);
    `neural_memory_model` is the memory network (copied per layer).
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        depth: int,
        ff_mult: float = 4.0,
        neural_memory_kwargs: dict | None = None,
        neural_memory_model: nn.Module | None = None,
        num_residual_streams: int = 4,
    ):
        check_positive_ints(dim=dim, depth=depth)
        memories = build_memories(depth, dim, None, neural_memory_kwargs, neural_memory_model)
        super().__init__(num_tokens, dim, [MemoryMixer(memory) for memory in memories], ff_mult, num_residual_streams)
