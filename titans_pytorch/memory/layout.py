"""One flat vector per (batch, head) for all of a memory network's fast weights.

The update treats the weights as one vector (`W_t = A W_{t-1} + ...` acts on every parameter
alike), so the state keeps them flat: one tensor, one op per update, whatever the network.
Each parameter is a view into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlatLayout:
    """Names and shapes of a network's parameters, in `named_parameters()` order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> "FlatLayout":
        params = dict(model.named_parameters())
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    def flatten(self, tensors: dict, leading: int) -> torch.Tensor:
        """`{name: (*lead, *shape)}` with `leading` lead dims -> `(*lead, size)`."""
        parts = [tensors[name] for name in self.names]
        return torch.cat([t.reshape(*t.shape[:leading], -1) for t in parts], dim=-1)

    def views(self, flat: torch.Tensor) -> dict:
        """`(*lead, size)` -> `{name: (*lead, *shape)}`, views into `flat`."""
        # one split (its backward is one concatenation), not a slice per parameter
        parts = flat.split(self.sizes, dim=-1)
        return {name: part.unflatten(-1, shape) if shape else part[..., 0]
                for name, shape, part in zip(self.names, self.shapes, parts)}
