"""The residual norm's Triton kernels (`memory/residual_norm_triton.py`) against the aten ops they
replace (`fused.AtenResidualNorm`), and the fused loop through them against the loop through aten.
On a CPU they run under the Triton interpreter (`TRITON_INTERPRET=1`, set before Triton is first
imported, hence a subprocess); the CUDA tests run them compiled."""

import os
import subprocess
import sys

import pytest
import torch

COMMON = """
import torch
import titans_pytorch.memory.fused as fused
import titans_pytorch.memory.residual_norm_triton as kernels
from titans_pytorch import LinearMemory, NeuralMemory, ResidualNormMemory


def chunk_inputs(batch, chunk, dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, chunk, dim, dtype=dtype, generator=g)
    offset = torch.randn(batch, 3, chunk, dim, dtype=dtype, generator=g).transpose(0, 1)[1]  # rows strided
    scale = torch.randn(batch, 2, dim + 7, dtype=dtype, generator=g)[:, 0, 3 : 3 + dim].unsqueeze(1)  # (B, 1, d), strided
    top, grad_products = (torch.randn(batch, chunk, dim, dtype=dtype, generator=g) for _ in range(2))
    return z, offset, scale, top, grad_products


def both_ways(impl, z, offset, scale, top, grad_products):
    residual, scaled = torch.empty_like(z), torch.empty_like(z)
    normed, mean, rstd, delta, scale_rows = impl.forward(z, offset, scale, residual, scaled)
    one = lambda t: t.unsqueeze(0)  # a call of one chunk
    backward = impl(one(z), one(normed), one(mean), one(rstd), one(residual), one(scaled), one(delta), one(scale[:, 0]))
    grad_z, grad_scale = backward.backward(0, top, grad_products)
    return (normed, mean, rstd, delta, scale_rows, residual, scaled, grad_z, grad_scale, backward.residual_grads()[0])
"""

KERNELS = COMMON + """
# float64: any shape, one tile or several (tokens in tiles of 8 / 2 / 1 elements' worth), chunk 1,
# widths that are not powers of two; float32 where the norm is well conditioned (d >= 4)
cases = [(torch.float64, shape) for shape in ((3, 4, 8), (2, 5, 6), (1, 1, 3), (2, 7, 2), (2, 9, 16))]
cases += [(torch.float32, shape) for shape in ((3, 4, 8), (2, 5, 6), (2, 9, 16))]
for tile in (2048, 8, 2, 1):
    kernels._TILE_ELEMENTS = tile
    for seed, (dtype, shape) in enumerate(cases):
        inputs = chunk_inputs(*shape, dtype, seed)
        expected = both_ways(fused.AtenResidualNorm, *inputs)
        got = both_ways(fused.TritonResidualNorm, *inputs)
        tolerance = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
        for index, (a, b) in enumerate(zip(expected, got)):
            torch.testing.assert_close(b, a, **tolerance, msg=lambda m: f"tile {tile}, {dtype}, {shape}, output {index}: {m}")
# an offset whose features are not contiguous (copied for the kernel)
z, offset, scale, top, grad_products = chunk_inputs(2, 5, 6, torch.float64, 99)
offset = offset.transpose(1, 2).contiguous().transpose(1, 2)
assert offset.stride(-1) != 1
expected = both_ways(fused.AtenResidualNorm, z, offset, scale, top, grad_products)
for a, b in zip(expected, both_ways(fused.TritonResidualNorm, z, offset, scale, top, grad_products)):
    torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
print("ok")
"""

LOOP = COMMON + """
import dataclasses
from torch.utils._python_dispatch import TorchDispatchMode


class Kernels(TorchDispatchMode):
    # what would be GPU kernels: aten compute ops (not views, not allocations) and Triton launches
    # (the interpreter's own aten ops inside a launch are not counted)

    def __init__(self):
        super().__init__()
        self.count, self.launching = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not (func.is_view or self.launching or func.__name__.startswith("empty"))
        return func(*args, **(kwargs or {}))


class Counted:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            mode.count += 1
            mode.launching = True
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                mode.launching = False
        return launch


kernels._forward_kernel, kernels._backward_kernel = Counted(kernels._forward_kernel), Counted(kernels._backward_kernel)


def run(mem, x):
    global mode
    x = x.clone().requires_grad_()
    with Kernels() as mode:
        out, state = mem(x, return_state=True)
        (out.square().sum() + state.flat.square().sum()).backward()
    results = [out, state.flat, x.grad, *(p.grad.clone() for p in mem.parameters())]
    mem.zero_grad()
    return results, mode.count


# the default network with and without momentum, and the norm around a single matrix
for momentum, model in ((True, None), (False, None), (True, ResidualNormMemory(6, model=LinearMemory(6)))):
    torch.manual_seed(0)
    mem = NeuralMemory(dim=12, heads=2, dim_head=6, chunk_size=3, momentum=momentum, model=model).double()
    mem.network = dataclasses.replace(mem.network, loop="fused")
    counts = {}
    for chunks in (2, 6):
        x = torch.randn(2, 3 * chunks, 12, dtype=torch.float64)
        fused.NORM_KERNELS = "auto"  # aten on a CPU
        expected, counts["aten", chunks] = run(mem, x)
        fused.NORM_KERNELS = "triton"
        got, counts["triton", chunks] = run(mem, x)
        for a, b in zip(expected, got):
            torch.testing.assert_close(b, a, atol=1e-11, rtol=1e-9)
    # per chunk, one kernel each way in place of 5 aten ops forward and 11 backward
    per_chunk = lambda kind: (counts[kind, 6] - counts[kind, 2]) / 4
    assert per_chunk("aten") - per_chunk("triton") == 14, (per_chunk("aten"), per_chunk("triton"))
print("ok")
"""


def interpreted(script):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_kernels_equal_the_aten_ops_under_the_triton_interpreter():
    result = interpreted(KERNELS)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_fused_loop_through_the_kernels_equals_it_through_aten_under_the_triton_interpreter():
    result = interpreted(LOOP)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("chunk, dim", [(5, 6), (64, 64)])
def test_kernels_compile_for_an_h100(dtype, chunk, dim):
    # what the interpreter does not check: Triton's compiler (front end, MLIR, LLVM and its bundled
    # ptxas) for sm_90, run here without a GPU
    triton = pytest.importorskip("triton")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas for NVIDIA targets")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from titans_pytorch.memory import residual_norm_triton as kernels
    from titans_pytorch.memory.fused import LAYER_NORM_EPS

    blocks = kernels._blocks(chunk, dim)
    num_warps = blocks.pop("num_warps")
    for kernel in (kernels._forward_kernel, kernels._backward_kernel):
        constants = {"CHUNK": chunk, "DIM": dim, **blocks}
        if "EPS" in kernel.arg_names:
            constants["EPS"] = LAYER_NORM_EPS
        signature = {name: f"*{dtype}" if name.endswith("_ptr") else "i64" if name.endswith("_row") else "constexpr"
                     for name in kernel.arg_names}
        assert set(name for name, kind in signature.items() if kind == "constexpr") == set(constants)
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=num_warps))
        assert ".entry" in compiled.asm["ptx"] and compiled.asm["cubin"]


def test_the_aten_ops_run_on_a_cpu():
    from titans_pytorch.memory import fused

    assert fused._residual_norm(torch.zeros(1)) is fused.AtenResidualNorm


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(16, 4, 64), (32, 64, 64), (4, 16, 384)])  # base MAC, seed example, one wide head
def test_kernels_on_cuda_equal_the_aten_ops(dtype, shape):
    namespace = {}
    exec(COMMON, namespace)
    fused = namespace["fused"]
    assert fused._residual_norm(torch.zeros(1, device="cuda")) is fused.TritonResidualNorm
    inputs = [t.cuda() for t in namespace["chunk_inputs"](*shape, dtype, 0)]
    # a constant row and a nearly constant one: where the norm's eps matters (kept at its float64 value)
    inputs[0][0, 0] = 0.5
    inputs[0][-1, -1] = 0.5 + 1e-4 * torch.randn(shape[-1], dtype=dtype, device="cuda")
    expected = namespace["both_ways"](fused.AtenResidualNorm, *inputs)
    got = namespace["both_ways"](fused.TritonResidualNorm, *inputs)
    tolerance = dict(atol=1e-10, rtol=1e-8) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, **tolerance)
