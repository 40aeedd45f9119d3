"""Titans: Learning to Memorize at Test Time, in PyTorch."""

from .memory_models import LinearMemory, MemoryMLP, ResidualNormMemory, validate_memory_model
from .neural_memory import Addresses, NeuralMemory, NeuralMemoryState

__all__ = [
    "NeuralMemory",
    "NeuralMemoryState",
    "Addresses",
    "LinearMemory",
    "MemoryMLP",
    "ResidualNormMemory",
    "validate_memory_model",
]

from .lmm import MemoryTransformer
from .mac import MemoryAsContextTransformer
from .mag import MemoryAsGateTransformer
from .mal import MemoryAsLayerTransformer
from .transformer import TitansTransformer, TransformerCache

__all__ += [
    "MemoryAsContextTransformer",
    "MemoryAsGateTransformer",
    "MemoryAsLayerTransformer",
    "MemoryTransformer",
    "TitansTransformer",
    "TransformerCache",
]
