"""Speed and memory of `NeuralMemory`, measured against this machine's matmul rate.

    python benchmarks/bench_memory.py                 # full run (CUDA if available)
    python benchmarks/bench_memory.py --threads 1     # the CPU reference setting
    python benchmarks/bench_memory.py --quick         # tiny sizes, smoke test
    python benchmarks/bench_memory.py --only-dispatch # just (1)
    python benchmarks/bench_memory.py --only-loops    # just (1b)

Prints (1) what one chunk costs the host at a tiny size (dim 32, 8 heads of 4, chunk 16, where
arithmetic is negligible): aten compute ops dispatched per chunk, forward and backward, and host
microseconds per chunk, for each memory network; on a GPU the host's time per chunk is the GPU's
time per chunk unless the GPU is slower; (2) the fp32 rate of a 2048^3 matmul; (3) forward /
forward+backward time, tokens/s, peak memory and an analytic FLOP count for a few
configurations, with one causal SDPA attention layer of the same width as a yardstick on CUDA;
(4) a sequence-length sweep of the seed configuration next to that attention layer. (1b) times
the built-in networks' two chunk loops (fused, dual form) against each other by chunk size, at the
memory shape of train_mac.py's base preset: the measurement `ClosedFormNetwork.loop_for` follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from titans_pytorch import LinearMemory, MemoryMLP, NeuralMemory
from titans_pytorch.memory import fused


def memory_flops(batch, seq_len, dim, heads, dim_head, expansion=4, sets=2):
    """Analytic (forward, forward+backward) FLOPs of `NeuralMemory` with the default memory model.

    Memory: per head a 2-layer MLP `d -> h = expansion * d -> d` (d = dim_head); one
    token through one of its matmuls costs `2 d h`. Per token and head:
      - forward of the memory on the key and on the query:   2 tokens * 2 layers * 2dh
      - backward of the key's loss to the hidden activation:  sets * 2dh
      - weight-gradient matmuls:                              2 layers * sets * 2dh
    where `sets` is the number of cotangent sets of the chunk's vector-Jacobian product
    (2 with momentum: the momentum and the weight sums; 1 without).
    Per token: q/k/v projections 3 * 2 * dim * heads * d, output projection
    2 * heads * d * dim when there is one (heads > 1 or heads * d != dim).
    Norms, gates, convolutions and the per-token chunk coefficients are ignored.
    Forward+backward is taken as ~3x forward (outer backward ~2x the forward it inverts).
    """
    d = dim_head
    layer = 2 * d * int(expansion * d)
    inner = 2 * 2 * layer + sets * layer + 2 * sets * layer
    proj = 3 * 2 * dim * heads * d + (2 * heads * d * dim if heads > 1 or heads * d != dim else 0)
    forward = batch * seq_len * (heads * inner + proj)
    return forward, 3 * forward


def median_time(fn, device, repeats):
    """Median wall time of `fn()` in seconds over `repeats` runs, after one warm-up run."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _triton_launch_hooks():
    """Triton's launch hook chain (where Triton 3.4+ is installed), else None."""
    try:
        from triton import knobs
    except ImportError:
        return None
    return getattr(knobs.runtime, "launch_enter_hook", None)


class DispatchCounter(TorchDispatchMode):
    """Counts what runs inside it: `compute`, the aten ops that do work (kernels on a GPU; not the
    allocations) plus the Triton kernels launched (the memory's on CUDA), and `views` (no data moved)."""

    def __init__(self):
        super().__init__()
        self.compute = self.views = 0
        self._hooks = _triton_launch_hooks()

    def _launched(self, *args, **kwargs):
        self.compute += 1

    def __enter__(self):
        if self._hooks is not None:
            self._hooks.add(self._launched)
        return super().__enter__()

    def __exit__(self, *exc):
        if self._hooks is not None:
            self._hooks.remove(self._launched)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.is_view:
            self.views += 1
        elif not func.__name__.startswith("empty"):
            self.compute += 1
        return func(*args, **(kwargs or {}))


def marginal_dispatch_cost(loss_of, inputs, span, repeats, before_step=lambda: None):
    """(forward ops, backward ops, host seconds forward+backward) per unit of work: the difference
    between the last and the first of `inputs`, which differ by `span` units, so per-call work
    cancels out. `loss_of(x)` is the forward, `before_step()` runs before each (zeroing gradients,
    say). Host time is the process's CPU time (with one thread, the host's work; another busy core
    does not inflate it), the least disturbed of `repeats` runs of each input, the inputs run in
    turn so that a slow spell of the machine hits all of them."""
    counts = []
    for x in inputs:
        before_step()
        loss_of(x).backward()  # warm-up
        before_step()
        with DispatchCounter() as forward:
            loss = loss_of(x)
        with DispatchCounter() as backward:
            loss.backward()
        counts.append((forward.compute, backward.compute))
    times = [float("inf")] * len(inputs)
    for _ in range(repeats):
        for index, x in enumerate(inputs):
            # host time: no device synchronisation
            start = time.process_time()
            before_step()
            loss_of(x).backward()
            times[index] = min(times[index], time.process_time() - start)
    return ((counts[-1][0] - counts[0][0]) / span, (counts[-1][1] - counts[0][1]) / span,
            (times[-1] - times[0]) / span)


def per_chunk_dispatch(make_memory, device, chunks=(4, 36), repeats=25):
    """(forward ops, backward ops, host microseconds forward+backward) per chunk, from
    `marginal_dispatch_cost` over inputs of `chunks[0]` and `chunks[1]` chunks."""
    mem = make_memory().to(device)
    inputs = [torch.randn(1, n * mem.chunk_size, mem.dim, device=device, requires_grad=True) for n in chunks]
    forward, backward, host = marginal_dispatch_cost(lambda x: mem(x).sum(), inputs, chunks[1] - chunks[0], repeats)
    return forward, backward, host * 1e6


def print_dispatch(device):
    """Section (1): per-chunk dispatch cost at the tiny size, for each built-in memory network."""
    tiny = dict(dim=32, heads=8, dim_head=4, chunk_size=16)
    networks = {
        "ResidualNormMemory (default)": lambda: NeuralMemory(**tiny),
        "MemoryMLP, depth 2": lambda: NeuralMemory(**tiny, model=MemoryMLP(4)),
        "LinearMemory": lambda: NeuralMemory(**tiny, model=LinearMemory(4)),
        "default, momentum off": lambda: NeuralMemory(**tiny, momentum=False),
    }
    rows = []
    for name, make in networks.items():
        torch.manual_seed(0)
        forward, backward, host = per_chunk_dispatch(make, device)
        rows.append((name, f"{forward:.0f}", f"{backward:.0f}", f"{forward + backward:.0f}", f"{host:,.0f}"))
    print("per chunk at the tiny size (dim 32, 8 heads of 4, chunk 16, batch 1): aten compute ops dispatched and"
          " host CPU time, forward+backward")
    print_table(("memory network", "ops forward", "ops backward", "ops total", "host us"), rows)


def print_loops(device, repeats, cases=((1, 4, 256), (2, 4, 256), (4, 4, 256), (8, 4, 256), (16, 4, 256),
                                       (64, 4, 256), (4, 4, 32), (4, 2, 256), (4, 1, 256))):
    """Forward+backward of one memory layer of train_mac.py's base preset (4 heads of 64, momentum)
    on `batch x length` tokens, on each chunk loop of the built-in networks, for each (chunk size,
    batch, length) case: 4 x 32 with chunk 4 is one segment of the base MAC; batch 2 and 1 halve and
    quarter the state (2^20 elements at batch 4). The two loops' runs are interleaved."""
    rows = []
    for chunk, batch, length in cases:
        x = torch.randn(batch, length, 256, device=device)
        mem = NeuralMemory(256, chunk_size=chunk, heads=4, dim_head=64).to(device)
        auto = mem.network
        networks = {loop: dataclasses.replace(auto, loop=loop) for loop in ("fused", "dual")}
        runs = {loop: [] for loop in networks}
        for _ in range(repeats + 1):  # interleaved, so that a drift of the machine's speed hits both; the first is warm-up
            for loop, network in networks.items():
                mem.network = network
                runs[loop].append(median_time(lambda: mem(x).square().mean().backward(), device, 1))
        times = {loop: statistics.median(t[1:]) for loop, t in runs.items()}
        state = torch.empty(batch * 4, 2, auto.layout.size, device="meta")
        picked = auto.loop_for(state, torch.empty(1, 1, chunk, 1, device=device))
        rows.append((chunk, f"{batch} x {length}", f"{times['fused'] * 1e3:,.1f}", f"{times['dual'] * 1e3:,.1f}",
                     f"{times['fused'] / times['dual']:.2f}", picked))
    print("chunk loops: NeuralMemory(256, heads=4, dim_head=64) forward+backward, ms")
    print_table(("chunk", "batch x len", "fused", "dual", "fused / dual", "auto picks"), rows)
    print()


def print_table(headers, rows):
    """Plain-text table: first column left-aligned, the others right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class CausalAttention(nn.Module):
    """The yardstick: one causal softmax attention layer (qkv projection, SDPA, out projection)."""

    def __init__(self, dim, heads=8):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        b, n, dim = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(out.transpose(1, 2).reshape(b, n, dim))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bf16"), default="float32", help="bf16: autocast bf16")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke-testing")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the sequence-length sweep")
    parser.add_argument("--sweep-lengths", default="1024,2048,4096,8192,16384", help="comma-separated lengths")
    parser.add_argument("--only-dispatch", action="store_true", help="only the per-chunk dispatch table")
    parser.add_argument("--only-loops", action="store_true", help="only the chunk loops' table")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA: also time forward+backward captured by torch.cuda.make_graphed_callables")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    print(
        f"device: {device_name(device)} ({device.type}) | dtype: {args.dtype} | "
        f"threads: {torch.get_num_threads()} | torch {torch.__version__}"
        + (" | QUICK (tiny sizes)" if args.quick else "")
    )

    # 1. what a chunk costs the host
    if not args.only_loops:
        print_dispatch(device)
    if args.only_dispatch:
        return
    # 1b. the two chunk loops by chunk size
    print_loops(device, args.repeats, ((2, 1, 64), (16, 1, 64)) if args.quick else print_loops.__defaults__[0])
    if args.only_loops:
        return

    # 2. this machine's fp32 matmul rate
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    matmul_rate = 2 * n**3 / median_time(lambda a=a, b=b: a @ b, device, args.repeats)
    print(f"fp32 matmul {n}x{n} @ {n}x{n}: {matmul_rate / 1e9:.1f} GFLOP/s\n")
    del a, b

    def timings(module, batch, seq_len, dim):
        """(forward s, forward+backward s, peak MiB) of `module` on a (batch, seq_len, dim) input."""
        x = torch.randn(batch, seq_len, dim, device=device)

        def forward():
            with torch.no_grad(), autocast:
                module(x)

        def forward_backward():
            module.zero_grad(set_to_none=True)
            with autocast:
                loss = module(x).float().square().mean()
            loss.backward()

        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        fwd = median_time(forward, device, args.repeats)
        fwd_bwd = median_time(forward_backward, device, args.repeats)
        return fwd, fwd_bwd, peak_memory_mib(device)

    def graphed_timing(module, batch, seq_len, dim):
        """(forward+backward s, capture s) with the module's forward and backward captured as CUDA graphs."""
        x = torch.randn(batch, seq_len, dim, device=device, requires_grad=True)
        start = time.perf_counter()
        graphed = torch.cuda.make_graphed_callables(module, (x,), num_warmup_iters=2)
        torch.cuda.synchronize(device)
        capture = time.perf_counter() - start

        def forward_backward():
            graphed(x).square().mean().backward()

        return median_time(forward_backward, device, args.repeats), capture

    # 3. configurations (on CUDA: the sizes of issue 12's table), each beside one causal SDPA layer of its width
    seed_kwargs = dict(dim=384, chunk_size=64, pre_rmsnorm=True)
    paper = dict(dim=512, heads=8, dim_head=64)
    configs = [
        ("seed", seed_kwargs, (2, 1024)),
        ("8x64, chunk 64", dict(paper, chunk_size=64), (8, 4096) if cuda else (2, 1024)),
        ("8x64, chunk 16", dict(paper, chunk_size=16), (8, 4096) if cuda else (2, 1024)),
        ("seed, refresh_every=4", dict(seed_kwargs, refresh_every=4), (2, 1024)),
    ]
    if cuda:
        configs.insert(3, ("8x64, chunk 16 (batch 2)", dict(paper, chunk_size=16), (2, 4096)))
    if args.quick:
        configs = [(name, kwargs, (1, 256)) for name, kwargs, _ in configs]
    rows, graphed_rows, seed_times = [], [], None
    for name, kwargs, (batch, seq_len) in configs:
        mem = NeuralMemory(**kwargs).to(device)
        fwd, fwd_bwd, peak = timings(mem, batch, seq_len, mem.dim)
        attention = CausalAttention(mem.dim, heads=8).to(device)
        _, attn_fwd_bwd, _ = timings(attention, batch, seq_len, mem.dim)
        flops_fwd, flops_fwd_bwd = memory_flops(batch, seq_len, mem.dim, mem.heads, mem.dim_head)
        rows.append((
            name, f"{batch}x{seq_len}", f"{fwd * 1e3:,.1f}", f"{fwd_bwd * 1e3:,.1f}", f"{batch * seq_len / fwd_bwd:,.0f}",
            f"{peak:,.0f}", f"{flops_fwd_bwd / 1e9:.1f}", f"{flops_fwd_bwd / fwd_bwd / matmul_rate:.1%}",
            f"{attn_fwd_bwd * 1e3:,.1f}",
        ))
        if name == "seed":
            seed_times = (fwd, fwd_bwd)
        if cuda and args.cuda_graphs:
            graphed, capture = graphed_timing(mem, batch, seq_len, mem.dim)
            fused.NORM_KERNELS = "aten"  # the same with the residual norm's aten ops instead of its Triton kernels
            try:
                graphed_aten, _ = graphed_timing(mem, batch, seq_len, mem.dim)
            finally:
                fused.NORM_KERNELS = "auto"
            graphed_rows.append((name, f"{batch}x{seq_len}", f"{fwd_bwd * 1e3:,.1f}", f"{graphed * 1e3:,.1f}",
                                 f"{capture:.1f}", f"{graphed_aten * 1e3:,.1f}"))
        del mem, attention
    print_table(
        ("config", "batch x len", "fwd ms", "fwd+bwd ms", "tok/s (f+b)", "peak MiB" if cuda else "peak RSS MiB",
         "GFLOP f+b", "f+b / matmul", "attention f+b ms"),
        rows,
    )
    print(
        "peak: torch.cuda.max_memory_allocated per config" if cuda
        else "peak RSS: whole-process peak resident memory so far (monotone, includes earlier rows)"
    )
    print("GFLOP: analytic estimate (memory_flops); f+b / matmul: achieved fraction of the fp32 matmul rate;"
          " attention: one causal SDPA layer with its projections, same width, 8 heads\n")
    if graphed_rows:
        print("captured with torch.cuda.make_graphed_callables (forward and backward as CUDA graphs); last column:"
              " the same with the residual norm in aten ops (memory/fused.py NORM_KERNELS = 'aten') instead of Triton")
        print_table(("config", "batch x len", "eager f+b ms", "graphed f+b ms", "capture s", "graphed, aten norm ms"),
                    graphed_rows)

    # 4. sequence-length sweep: seed memory vs one causal attention layer, batch 1
    if not args.skip_sweep:
        lengths = (256, 512, 1024) if args.quick else tuple(map(int, args.sweep_lengths.split(",")))
        mem = NeuralMemory(**seed_kwargs).to(device)
        attention = CausalAttention(mem.dim, heads=8).to(device)
        rows = []
        for seq_len in lengths:
            _, mem_fb, _ = timings(mem, 1, seq_len, mem.dim)
            _, attn_fb, _ = timings(attention, 1, seq_len, mem.dim)
            rows.append((seq_len, f"{mem_fb:.3f}", f"{mem_fb / seq_len * 1024 * 1e3:.1f}", f"{attn_fb:.3f}"))
        print("sweep (batch 1, seed config; attention: one causal SDPA layer, dim 384, 8 heads)")
        print_table(("seq_len", "memory fwd+bwd s", "memory ms/1K tok", "attention fwd+bwd s"), rows)

    # 5. the seed example against its bar (defined for CPU, 1 thread, 2 x 1024)
    if not cuda and torch.get_num_threads() == 1 and seed_times is not None:
        fwd, fwd_bwd = seed_times
        note = " [quick sizes: not comparable to the bar]" if args.quick else ""
        print(f"seed fwd {fwd:.3f} s (bar 0.8 s), fwd+bwd {fwd_bwd:.3f} s (bar 2.0 s){note}")


if __name__ == "__main__":
    main()
