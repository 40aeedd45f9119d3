"""Networks that can serve as the neural long-term memory `M`.

Each maps `(..., dim) -> (..., dim)` token by token. Their parameters are the memory's
*initial* fast weights `W_0`: `NeuralMemory` copies them per batch element and head and
keeps training those copies while it reads (the outer optimiser trains `W_0` itself).

Any `nn.Module` with the same contract can be used; `validate_memory_model` says why one
cannot. The built-in networks record their constructor arguments (`RecordsArguments`), so a
model using one can be saved with `save_pretrained`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .arguments import RecordsArguments

LAYER_NORM_EPS = 1e-5  # ResidualNormMemory's LayerNorm (the closed-form paths use the same)


class MemoryMLP(RecordsArguments, nn.Module):
    """`depth` linear maps `dim -> hidden -> ... -> dim` with GELU between them.

    `depth = 1` is a linear memory `M(x) = x W`. Hidden width is `int(dim * expansion)`.
    """

    def __init__(self, dim: int, depth: int = 2, expansion: float = 4.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        hidden = int(dim * expansion)
        dims = (dim, *((hidden,) * (depth - 1)), dim)
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(d_in, d_out)) for d_in, d_out in zip(dims[:-1], dims[1:])]
        )
        for weight in self.weights:
            nn.init.xavier_uniform_(weight)

    def forward(self, x):
        for index, weight in enumerate(self.weights):
            if index > 0:
                x = F.gelu(x)
            x = x @ weight
        return x


class LinearMemory(MemoryMLP):
    """A single matrix, `M(x) = x W`: with momentum off this is a gated delta rule."""

    def __init__(self, dim: int):
        super().__init__(dim, depth=1)


class ResidualNormMemory(RecordsArguments, nn.Module):
    """The paper's default memory: `M(x) = x + LN(mlp(x))`, the norm's scale a fast weight too."""

    def __init__(self, dim: int, depth: int = 2, expansion: float = 4.0, model: nn.Module | None = None):
        super().__init__()
        self.model = model if model is not None else MemoryMLP(dim, depth, expansion)
        self.norm_scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = self.model(x)
        # LayerNorm, divided by sqrt(dim) so the branch has unit norm like the L2-normalised
        # keys it is added to; a plain LN (norm sqrt(dim)) multiplies the inner loss's
        # curvature by dim and makes the test-time optimisation diverge
        dim = out.shape[-1]
        return x + F.layer_norm(out, (dim,), eps=LAYER_NORM_EPS) * (self.norm_scale * dim**-0.5)


def validate_memory_model(model: nn.Module, dim: int) -> None:
    """Raise a `TypeError`/`ValueError` naming why `model` cannot be a memory of width `dim`.

    A memory must hold at least one parameter and no buffers (its whole state is its
    fast weights), map `(..., dim)` to `(..., dim)`, treat tokens independently, and use
    every parameter it registers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    params = dict(model.named_parameters())
    if not params:
        raise ValueError("model must have at least one parameter: its parameters are the memory's fast weights")
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        raise ValueError(
            f"model must not register buffers (found {buffers}); the memory's state is its parameters only"
        )
    reference = next(iter(params.values()))
    probe = torch.randn(2, 3, dim, dtype=reference.dtype, device=reference.device)
    # copies, so the check neither touches the user's weights nor leaves grads on them
    probe_params = {name: p.detach().clone().requires_grad_() for name, p in params.items()}
    try:
        out = functional_call(model, probe_params, (probe,))
    except Exception as error:  # noqa: BLE001 - re-raised with context
        raise ValueError(f"model failed on an input of shape (..., {dim}): {error}") from error
    if not torch.is_tensor(out) or out.shape != probe.shape:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"model must map (..., {dim}) to (..., {dim}); it returned {shape} for {tuple(probe.shape)}")
    grads = torch.autograd.grad(out.square().sum(), list(probe_params.values()), allow_unused=True)
    unused = [name for name, grad in zip(probe_params, grads) if grad is None]
    if unused:
        raise ValueError(f"model parameters {unused} do not take part in its forward pass")
    with torch.no_grad():
        changed = probe.clone()
        changed[:, 0] += 1.0
        out_changed = functional_call(model, probe_params, (changed,))
        if not torch.allclose(out_changed[:, 1:], out[:, 1:]):
            raise ValueError("model must treat tokens independently: changing one token changed the output of another")
