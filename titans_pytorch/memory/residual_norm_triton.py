"""The residual norm of `ResidualNormMemory` in the fused chunk loop, one Triton kernel each way.

In `fused.py` a chunk's norm is a row of small aten ops: forward the LayerNorm, the residual
`e = o + n * s / sqrt(d)`, `e * s`, the LayerNorm's backward (the delta) and `e * n` (5 ops);
backward the gradients through all of them (11 ops, the residual's own gradient batched after the
loop). On a GPU each op is a kernel of a few
microseconds whatever its size, and the chunk loop runs them once per chunk. Here each direction
is one kernel: one program per (batch x head) row, over its chunk's `c` tokens in tiles of whole
tokens (the norm reduces over a token's `d` features; the scale's gradient sums over the tiles).

`fused.py` uses these on CUDA (`_residual_norm`) and its aten expressions everywhere else; the
tests run these kernels on CPU tensors under the Triton interpreter (`TRITON_INTERPRET=1`) and
check them equal to the aten ones, and the fused loop through them equal to the reference.
Shapes: `(B, c, d)` per chunk with features contiguous, the scale `(B, 1, d)`, mean and rstd
`(B, c, 1)`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _layer_norm_backward(grad, normed, rstd, mask, dim):
    """LN'(grad) without affine parameters: `rstd (grad - mean(grad) - n mean(grad n))`, rows of
    `dim` (in the working dtype)."""
    mean_grad = tl.sum(grad, 1) / dim
    mean_grad_normed = tl.sum(grad * normed, 1) / dim
    out = (grad - mean_grad[:, None] - normed * mean_grad_normed[:, None]) * rstd[:, None]
    return tl.where(mask, out, 0.0)


@triton.jit
def _in_dtype_of(like, value):
    """`value` in the dtype of `like`, as a block of one (constants and float arguments are float32)."""
    return tl.zeros([1], like.dtype) + value


@triton.jit
def _forward_kernel(z_ptr, z_row, offset_ptr, offset_row, scale_ptr, scale_row,
                    normed_ptr, mean_ptr, rstd_ptr, residual_ptr, scaled_ptr, delta_ptr, scale_rows_ptr,
                    EPS: tl.constexpr, CHUNK: tl.constexpr, DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row offsets can pass 2^31 elements
    features = tl.arange(0, BLOCK_D)[None, :]
    scale = tl.load(scale_ptr + row * scale_row + features, mask=features < DIM, other=0.0)
    for first in range(0, CHUNK, BLOCK_C):  # the chunk's tokens, a tile at a time (each token on its own)
        token = first + tl.arange(0, BLOCK_C)
        tokens = token[:, None]
        mask = (tokens < CHUNK) & (features < DIM)
        at = tokens * DIM + features
        z = tl.load(z_ptr + row * z_row + at, mask=mask, other=0.0)
        offset = tl.load(offset_ptr + row * offset_row + at, mask=mask, other=0.0)
        dim_ = _in_dtype_of(z, DIM)
        mean = tl.sum(z, 1) / dim_
        centred = tl.where(mask, z - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / dim_ + EPS)
        normed = centred * rstd[:, None]
        residual = offset + normed * scale / tl.sqrt(dim_)  # e = o + LN(z) s / sqrt(d)
        scaled = residual * scale
        out = row * CHUNK * DIM + at  # the outputs are contiguous
        tl.store(normed_ptr + out, normed, mask=mask)
        tl.store(residual_ptr + out, residual, mask=mask)
        tl.store(scaled_ptr + out, scaled, mask=mask)
        tl.store(delta_ptr + out, _layer_norm_backward(scaled, normed, rstd, mask, dim_), mask=mask)
        tl.store(scale_rows_ptr + out, residual * normed, mask=mask)
        tl.store(mean_ptr + row * CHUNK + token, mean, mask=token < CHUNK)
        tl.store(rstd_ptr + row * CHUNK + token, rstd, mask=token < CHUNK)


@triton.jit
def _backward_kernel(top_ptr, products_ptr, normed_ptr, rstd_ptr, residual_ptr, delta_ptr, scale_ptr, scale_row,
                     grad_residual_ptr, grad_z_ptr, grad_scale_ptr,
                     CHUNK: tl.constexpr, DIM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row offsets can pass 2^31 elements
    features = tl.arange(0, BLOCK_D)[None, :]
    scale = tl.load(scale_ptr + row * scale_row + features, mask=features < DIM, other=0.0)
    grad_scale = tl.zeros([BLOCK_D], scale.dtype)  # summed over the chunk's tokens
    for first in range(0, CHUNK, BLOCK_C):
        token = first + tl.arange(0, BLOCK_C)
        tokens = token[:, None]
        mask = (tokens < CHUNK) & (features < DIM)
        at = row * CHUNK * DIM + tokens * DIM + features
        top = tl.load(top_ptr + at, mask=mask, other=0.0)  # d/d delta
        grad_products = tl.load(products_ptr + at, mask=mask, other=0.0)  # d/d(e * n)
        normed = tl.load(normed_ptr + at, mask=mask, other=0.0)
        residual = tl.load(residual_ptr + at, mask=mask, other=0.0)
        delta = tl.load(delta_ptr + at, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + row * CHUNK + token, mask=token < CHUNK, other=0.0)
        scaled = residual * scale
        dim_ = _in_dtype_of(top, DIM)
        branch_scale = 1.0 / tl.sqrt(dim_)
        # delta = LN'(e * s), e = o + n s / sqrt(d), and the sums' e * n
        grad_scaled = _layer_norm_backward(top, normed, rstd, mask, dim_)  # d/d(e * s)
        grad_residual = grad_scaled * scale + grad_products * normed
        grad_scale += tl.sum(grad_scaled * residual + grad_residual * normed * branch_scale, 0)
        # n: through e, e * n, and LN' itself (its n and rstd depend on z)
        factor = rstd * (-1.0 / dim_)
        grad_normed = (top * (tl.sum(scaled * normed, 1) * factor)[:, None]
                       + scaled * factor[:, None] * tl.sum(top * normed, 1)[:, None]
                       + grad_products * residual + grad_residual * scale * branch_scale)
        through_rstd = tl.sum(top * delta, 1) * factor
        grad_z = _layer_norm_backward(grad_normed, normed, rstd, mask, dim_) + normed * through_rstd[:, None]
        tl.store(grad_residual_ptr + at, grad_residual, mask=mask)
        tl.store(grad_z_ptr + at, grad_z, mask=mask)
    tl.store(grad_scale_ptr + row * DIM + tl.arange(0, BLOCK_D), grad_scale, mask=tl.arange(0, BLOCK_D) < DIM)


def _with_rows(t):
    """`t (B, c|1, d)` and the stride between its rows, each row's tokens and features contiguous
    (a copy of `t` where they are not: the loop's own inputs are)."""
    if t.stride(-1) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        t = t.contiguous()
    return t, t.stride(0)


# a program holds a tile of at most this many elements per tensor in registers (several tensors live
# at once); a token's features are never split, so beyond 2,048 features (float64: 4,096 in a
# compile for sm_90, float32: 8,192) the tile spills registers: slower, not wrong
_TILE_ELEMENTS = 2048


def _on_device_of(t):
    """Triton launches on the current CUDA device and stream, not on the tensors' device: make it theirs."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _blocks(chunk, dim):
    """Tile sizes: every feature of a token at once (the norm reduces over them), as many tokens as fit."""
    features = triton.next_power_of_2(dim)
    tokens = min(triton.next_power_of_2(chunk), max(1, _TILE_ELEMENTS // features))
    return dict(BLOCK_C=tokens, BLOCK_D=features, num_warps=4 if tokens * features <= 1024 else 8)


def residual_norm_forward(z, offset, scale, eps, residual, scaled):
    """z, offset `(B, c, d)`, scale `(B, 1, d)`, the LayerNorm's `eps` (a float; compiled into the
    kernel, so that float64 keeps all of it) -> `(normed, mean, rstd, delta, scale_rows)`:
    `LN(z)`, its mean and rstd `(B, c, 1)`, `delta = LN'(e * scale)` and `e * normed`, each
    `(B, c, d)` unless said, where `e = offset + normed * scale / sqrt(d)`; `e` is written into
    `residual` and `e * scale` into `scaled` (contiguous `(B, c, d)`)."""
    batch, chunk, dim = z.shape
    if not (residual.is_contiguous() and scaled.is_contiguous()):
        raise ValueError("residual_norm_forward: residual and scaled must be contiguous")
    normed, delta, scale_rows = (torch.empty(batch, chunk, dim, dtype=z.dtype, device=z.device) for _ in range(3))
    mean, rstd = (torch.empty(batch, chunk, 1, dtype=z.dtype, device=z.device) for _ in range(2))
    with _on_device_of(z):
        _forward_kernel[(batch,)](
            *_with_rows(z), *_with_rows(offset), *_with_rows(scale),
            normed, mean, rstd, residual, scaled, delta, scale_rows, eps, chunk, dim, **_blocks(chunk, dim))
    return normed, mean, rstd, delta, scale_rows


def residual_norm_backward(top, grad_products, normed, rstd, residual, delta, scale):
    """The gradients through `residual_norm_forward`, given those of its delta (`top`) and its
    `e * n` (`grad_products`), each `(B, c, d)`: returns the residual's `(B, c, d)` (it is the
    offset's), z's `(B, c, d)` and the scale's summed over the chunk `(B, d)`."""
    batch, chunk, dim = top.shape
    tensors = [t.contiguous() for t in (top, grad_products, normed, rstd, residual, delta)]  # as they come: no copy
    grad_residual, grad_z = torch.empty_like(tensors[0]), torch.empty_like(tensors[0])
    grad_scale = torch.empty(batch, dim, dtype=top.dtype, device=top.device)
    with _on_device_of(top):
        _backward_kernel[(batch,)](
            *tensors, *_with_rows(scale), grad_residual, grad_z, grad_scale, chunk, dim, **_blocks(chunk, dim))
    return grad_residual, grad_z, grad_scale
