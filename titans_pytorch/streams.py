"""The residual streams: the hyper-connections library's `HyperConnections`, computed in fewer passes.

Every layer of every model (MAC, MAG, MAL, LMM) reads and writes its residual streams through
two hyper-connections, and at `train_mac.py`'s base size (4 x 512 tokens, 4 streams of 384) each
stream tensor is 12.6 MB. The library's forward normalises the streams into a new tensor of
that size, mixes them into one tensor holding the branch input and the new streams and slices
it (the slices' backward fills a zeroed copy of the whole mix for each), and spreads the branch's
output over the streams as its own tensor before adding it: on a CPU, where every fresh tensor
of that size is page-faulted in, one hyper-connection's forward and backward cost about twice
what the same math costs written as

    r     = 1 / max(||x_s||, eps)                           per token and stream (no normalised copy)
    act   = tanh(r (x_s @ (sqrt(d) (1 + gamma) [alpha_fn | beta_fn])))   (T, S, S + 2): small
    alpha = static_alpha + alpha_scale act[..., :S+1];   beta = static_beta + beta_scale act[..., S+1]
    branch_input = alpha[:, :, 0]^T x,   streams = alpha[:, :, 1:]^T x    (batched matmuls, no slices)
    out   = streams + beta branch_output                   (one baddbmm)

which is the library's width and depth connection (`F.normalize(x) * sqrt(d) * (gamma + 1)`
projected, since the normalisation is a per-row scale that commutes with the projection).
`FusedHyperConnections` is the library's module, its parameters and their keys untouched, with
this forward for the layout the models use; the tests check it equals the library's forward,
values and every gradient, in float64.
"""

from __future__ import annotations

import torch
from hyper_connections.hyper_connections import HyperConnections
from torch.autograd.function import once_differentiable


class _NormalisedProjection(torch.autograd.Function):
    """`(x / max(||x||, eps)) @ weight` over the last dim: x `(T, S, d)`, weight `(d, n)` -> `(T, S, n)`,
    keeping for the backward x (kept by the mix anyway), the projection and one norm a row."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        projected = x @ weight
        ctx.save_for_backward(x, weight, norm, projected)
        ctx.eps = eps
        return projected / norm.clamp_min(eps)

    @staticmethod
    @once_differentiable  # (its saved norm and projection carry no graph: a second derivative would be wrong)
    def backward(ctx, grad):
        x, weight, norm, projected = ctx.saved_tensors
        inverse = norm.clamp_min(ctx.eps).reciprocal_()
        scaled = grad * inverse  # (T, S, n)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = x.flatten(0, -2).T @ scaled.flatten(0, -2)
        grad_x = scaled @ weight.T
        # through the norm, d(1 / ||x||)/dx = -x / ||x||^3, where it is not clamped (zero rows stay zero);
        # its factor 1 / ||x||^2 in float32 at least (in float16 it overflows below norms of 1/256)
        wide = torch.promote_types(x.dtype, torch.float32)
        through_norm = (scaled * projected).sum(-1, keepdim=True).to(wide) * inverse.to(wide).square()
        through_norm = through_norm * (norm >= ctx.eps).to(wide)
        return grad_x.addcmul_(x, through_norm, value=-1), grad_weight, None


class _StreamMix(torch.autograd.Function):
    """The width connection's mix, without slicing one result: x `(T, S, d)`, alpha `(T, S, S + 1)` ->
    branch input `alpha[..., :1]^T x (T, 1, d)` and streams `alpha[..., 1:]^T x (T, S, d)`."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x, alpha)
        mixing = alpha.transpose(1, 2)
        return torch.bmm(mixing[:, :1], x), torch.bmm(mixing[:, 1:], x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_branch, grad_streams):
        x, alpha = ctx.saved_tensors
        to_branch, to_streams = alpha[..., :1].contiguous(), alpha[..., 1:].contiguous()
        grad_x = torch.bmm(to_branch, grad_branch).baddbmm_(to_streams, grad_streams)  # in place: no copy of the first
        grad_alpha = torch.cat((torch.bmm(x, grad_branch.transpose(1, 2)), torch.bmm(x, grad_streams.transpose(1, 2))), dim=-1)
        return grad_x, grad_alpha


class FusedHyperConnections(HyperConnections):
    """The library's `HyperConnections` (Algorithm 2 of Zhu et al., 2024), for its default options
    (one input view, no fractions, tanh, channels last, no dropout), computed as the module docstring
    says. `connection(x)` with `x ((batch streams), 1, dim)` -> `(branch_input (batch, 1, dim),
    add_residual)`, `add_residual(branch_output (batch, 1, dim)) -> ((batch streams), 1, dim)` (once), as the
    library's (`branch_output` a tensor); any other layout goes through the library's forward. Under
    autocast the mix runs in the streams' dtype (the library's runs as a half-precision matmul)."""

    def __init__(self, num_residual_streams: int, *, dim: int, layer_index: int | None = None):
        super().__init__(num_residual_streams, dim=dim, layer_index=layer_index)

    def forward(self, residuals):
        streams = self.num_residual_streams
        if residuals.ndim != 3 or residuals.shape[1] != 1:
            return super().forward(residuals)
        dim = residuals.shape[-1]
        with torch.autocast(residuals.device.type, enabled=False):
            x = residuals.view(-1, streams, dim)  # (T, S, d): a token's streams side by side
            dtype = x.dtype
            scale = (self.norm.gamma.to(dtype) + 1) * self.norm.scale
            weight = torch.cat((self.dynamic_alpha_fn, self.dynamic_beta_fn[:, None]), dim=1).to(dtype) * scale[:, None]
            act = torch.tanh(_NormalisedProjection.apply(x, weight, 1e-12))  # F.normalize's eps
            alpha = torch.addcmul(self.static_alpha.to(dtype), act[..., :-1], self.dynamic_alpha_scale.to(dtype))
            beta = torch.addcmul(self.static_beta.to(dtype)[:, None], act[..., -1:], self.dynamic_beta_scale.to(dtype))
            branch_input, mixed = _StreamMix.apply(x, alpha)

        added = []

        def add_residual(branch_output):
            # into the mix in place (an out-of-place baddbmm copies its input first), so once a connection
            if added:
                raise RuntimeError("add_residual adds into its connection's mix in place: call it once per connection")
            with torch.autocast(residuals.device.type, enabled=False):
                branch = branch_output.to(dtype).reshape(-1, 1, dim)
                out = mixed.baddbmm_(beta, branch).view(residuals.shape)
            added.append(True)
            return out

        return branch_input, add_residual
