"""Titans: Learning to Memorize at Test Time, in PyTorch."""

from .memory_models import LinearMemory, MemoryMLP, ResidualNormMemory, validate_memory_model
from .neural_memory import NeuralMemory, NeuralMemoryState

__all__ = [
    "NeuralMemory",
    "NeuralMemoryState",
    "LinearMemory",
    "MemoryMLP",
    "ResidualNormMemory",
    "validate_memory_model",
]

from .mac import MemoryAsContextTransformer
from .transformer import TitansTransformer, TransformerCache

__all__ += ["MemoryAsContextTransformer", "TitansTransformer", "TransformerCache"]
