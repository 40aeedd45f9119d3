"""Titans language-model timings (MAC by default): what one segment costs the host at a tiny
size, the training step of the train_mac.py-sized model, and decoding cost per token against
context length; on CUDA the training step and decoding also replayed from CUDA graphs, with what
capturing them took.

    python benchmarks/bench_mac.py --threads 2
    python benchmarks/bench_mac.py --threads 2 --model lmm --skip-train
    python benchmarks/bench_mac.py --only-segment      # just the op counts (segment, decoding step), every model
    python benchmarks/bench_mac.py --breakdown         # the training step with parts switched off
    python benchmarks/bench_mac.py --hyper-connections # the fused hyper-connections against the library's forward

The per-segment table is the day-to-day measure of the GPU's wait on Python: at the tiny size
(dim 32, 8 attention heads of 4, memory of 4 heads of 8, the base preset's depth, segment 32,
chunk 4 and memory layers) arithmetic is negligible, so what a segment costs is the host's work:
the aten compute ops it dispatches, forward and backward, and the CPU time they take. The decoding
table beside it counts a one-token step's ops, cached eagerly and as replayed from `GraphDecoder`'s
graphs: under a CUDA graph each is a kernel, so the count is the GPU's time per token at small sizes.
"""

import argparse
import dataclasses
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from bench_memory import DispatchCounter, device_name, marginal_dispatch_cost, median_time, print_table  # the sibling script's helpers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_mac import MODEL_CLASSES, PRESETS, build_model  # noqa: E402  (the trainer's models)
from titans_pytorch import NeuralMemory  # noqa: E402
from titans_pytorch.cuda_graphs import GraphedLoss, rerun_eagerly  # noqa: E402
from titans_pytorch.decoding import GraphDecoder  # noqa: E402
from hyper_connections.hyper_connections import HyperConnections  # noqa: E402
from titans_pytorch.streams import FusedHyperConnections  # noqa: E402


def train_model(device, name="mac", ff_mult=4.0, segment_len=None, chunk_size=None):
    # train_mac.py's base preset, the peer's train_mac.py model: dim 384, depth 8, segment 32,
    # 8 heads of 64, neural memory on layers 2, 4, 6 with 4 heads of 64 and chunk 4
    arch = {**PRESETS["base"]["arch"], "ff_mult": ff_mult}
    if segment_len is not None:
        arch["segment_len"] = segment_len
    if chunk_size is not None:
        arch["neural_memory_kwargs"] = {**arch["neural_memory_kwargs"], "chunk_size": chunk_size}
    return build_model(name, arch).to(device)


def tiny_model(name, device):
    """The base preset's structure (depth, segment, chunk, memory layers, streams) at a tiny width."""
    arch = {**PRESETS["base"]["arch"], "dim": 32, "dim_head": 4,
            "neural_memory_kwargs": {**PRESETS["base"]["arch"]["neural_memory_kwargs"], "dim_head": 8}}
    torch.manual_seed(0)
    return build_model(name, arch).to(device)


def per_segment_cost(name, device, segments=(2, 10), repeats=7):
    """(forward ops, backward ops, host ms forward+backward) per segment of the tiny model, batch 1,
    from `marginal_dispatch_cost` over inputs of `segments[0]` and `segments[1]` segments."""
    model = tiny_model(name, device)
    segment_len = PRESETS["base"]["arch"]["segment_len"]
    inputs = [torch.randint(0, 256, (1, n * segment_len + 1), device=device) for n in segments]
    forward, backward, host = marginal_dispatch_cost(
        lambda ids: model(ids, return_loss=True), inputs, segments[1] - segments[0], repeats,
        before_step=lambda: model.zero_grad(set_to_none=True),
    )
    return forward, backward, host * 1e3


def print_segment_cost(names, device):
    rows = []
    for name in names:
        forward, backward, host = per_segment_cost(name, device)
        rows.append((name, f"{forward:.0f}", f"{backward:.0f}", f"{forward + backward:.0f}", f"{host:.1f}"))
    print("per segment of 32 tokens at the tiny size (dim 32, base preset's depth, memory layers and chunk, batch 1):"
          " aten compute ops dispatched and host CPU time, forward+backward")
    print_table(("model", "ops forward", "ops backward", "ops total", "host ms"), rows)


def decoding_ops(name, device, context=256, steps=64):
    """Aten compute ops a one-token step of the tiny model dispatches, averaged over `steps` steps
    after `context` tokens: cached eagerly (the forward's check of the ids included: 5 ops), and what
    `GraphDecoder`'s graphs replay (the kernels a CUDA graph holds; counted through the CPU stand-in
    `rerun_eagerly`, after a first pass over the same steps has captured every kind; the decoder's own
    copies outside the graphs, the ids and the offset each step and a cache between two graphs when a
    period wraps, are not counted)."""
    model = tiny_model(name, device).eval()
    prompt = torch.randint(0, 256, (1, context), device=device)
    replayed = DispatchCounter()

    def counted_capture(fn, pool=None, device=None):
        def counted():
            with replayed:
                return fn()
        return rerun_eagerly(counted, pool, device)

    def run(step):
        c = cache
        for _ in range(steps):
            _, c = step(token, c)

    with torch.no_grad():
        _, cache = model(prompt, return_cache=True)
        token = prompt[:, -1:]
        with DispatchCounter() as eager:
            run(lambda t, c: model(t, cache=c, return_cache=True))
        decoder = GraphDecoder(model, counted_capture)
        run(decoder)  # the first pass captures every kind of step
        replayed.compute = 0
        run(decoder)
    return eager.compute / steps, replayed.compute / steps


def print_decoding_ops(names, device):
    rows = [(name, *(f"{ops:.0f}" for ops in decoding_ops(name, device))) for name in names]
    print("per decoding step at the tiny size, after 256 tokens (batch 1, the mean of 64 one-token steps):"
          " aten compute ops dispatched")
    print_table(("model", "ops cached", "ops from graphs"), rows)


def library_hyper_connections(model):
    """Back to the hyper-connections library's own forward (`FusedHyperConnections` computes the same)."""
    for module in model.modules():
        if isinstance(module, FusedHyperConnections):
            module.forward = types.MethodType(HyperConnections.forward, module)


def print_breakdown(device, batch, seq_len, repeats):
    """The base MAC's training step with its memory layers and its hyper-connection streams switched
    off in turn, and on each chunk loop: what each part costs (each row one run: `repeats` steps'
    median). "as is" runs the loop `ClosedFormNetwork.loop_for` picks, which depends on the batch."""
    arch = PRESETS["base"]["arch"]
    # (label, model, architecture, the memory layers' chunk loop: "auto" is the library's choice, a change made after building)
    variants = (("MAC (the base preset)", "mac", arch, "auto", None),
                ("MAC, memory on the fused chunk loop", "mac", arch, "fused", None),
                ("MAC, memory on the dual form", "mac", arch, "dual", None),
                ("MAC, the hyper-connections library's forward", "mac", arch, "auto", library_hyper_connections),
                ("MAC, one residual stream", "mac", {**arch, "num_residual_streams": 1}, "auto", None),
                ("no memory layers", "window", arch, "auto", None),
                ("no memory layers, one residual stream", "window", {**arch, "num_residual_streams": 1}, "auto", None))
    ids = torch.randint(0, 256, (batch, seq_len + 1), device=device)
    rows = []
    for label, name, variant, loop, change in variants:
        torch.manual_seed(0)
        model = build_model(name, variant).to(device)
        for module in model.modules():
            if isinstance(module, NeuralMemory):  # memory/closed_form.py: the loop the built-in networks run
                module.network = dataclasses.replace(module.network, loop=loop)
        if change is not None:
            change(model)

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, return_loss=True).backward()

        rows.append((label, f"{median_time(step, device, repeats):.2f}"))
    print(f"training step (forward+backward), batch {batch} x {seq_len}, parts switched off")
    print_table(("model", "seconds"), rows)


def print_hyper_connections(device, batch, seq_len, repeats, context=256, steps=32):
    """`FusedHyperConnections` against the library's forward on the same module, interleaved: one
    hyper-connection of the base size (4 streams of 384) around a linear branch, forward+backward on
    `batch x seq_len` tokens, and the base MAC's cached decoding step after `context` tokens."""
    torch.manual_seed(0)
    dim = PRESETS["base"]["arch"]["dim"]
    connection = FusedHyperConnections(4, dim=dim, layer_index=1).to(device)
    library = lambda x: HyperConnections.forward(connection, x)  # noqa: E731
    x = torch.randn(batch * seq_len * 4, 1, dim, device=device, requires_grad=True)
    branch, grad = torch.nn.Linear(dim, dim, device=device), torch.randn_like(x)

    def one_connection(forward):
        branch_input, add_residual = forward(x)
        add_residual(branch(branch_input)).backward(grad)

    # two copies of the base MAC with the same weights, the second on the library's forward
    models = {use_library: train_model(device).eval() for use_library in (False, True)}
    models[True].load_state_dict(models[False].state_dict())
    library_hyper_connections(models[True])
    ids = torch.randint(0, 256, (1, context), device=device)
    token = torch.randint(0, 256, (1, 1), device=device)
    with torch.no_grad():
        caches = {use_library: model(ids, return_cache=True)[1] for use_library, model in models.items()}

    def decode_step(use_library):
        caches[use_library] = models[use_library](token, cache=caches[use_library], return_cache=True)[1]
    # (label, run, repeats, with gradients)
    cases = (("one hyper-connection, forward+backward", lambda use_library: one_connection(library if use_library else connection),
              repeats, True),
             (f"cached decoding step of the base MAC after {context} tokens", decode_step, steps, False))
    rows = []
    for label, run, count, grad_enabled in cases:
        times = {False: [], True: []}
        for _ in range(count):  # interleaved, so that a drift of the machine's speed hits both
            for use_library in (False, True):
                with torch.set_grad_enabled(grad_enabled):
                    times[use_library].append(median_time(lambda: run(use_library), device, 1))
        fused, lib = (statistics.median(times[k]) * 1e3 for k in (False, True))
        rows.append((label, f"{fused:.1f}", f"{lib:.1f}", f"{lib / fused:.2f}"))
    print(f"hyper-connections: fused forward against the library's, batch {batch} x {seq_len} tokens, ms (medians)")
    print_table(("case", "fused", "library's forward", "ratio"), rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--decode-contexts", default="256,4096")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--model", choices=sorted(MODEL_CLASSES), default="mac")
    parser.add_argument("--ff-mult", type=float, default=4.0, help="5.0: 19.7M parameters, near the peer 0.5.5 model's 19.8M (compare_published.py's count)")
    parser.add_argument("--segment-len", type=int, help="the timed model's segment (default: the base preset's 32)")
    parser.add_argument("--chunk-size", type=int, help="its memory's chunk (default: the base preset's 4)")
    parser.add_argument("--only-segment", action="store_true",
                        help="only the op counts (per segment, per decoding step) and the segment's host cost, every model")
    parser.add_argument("--breakdown", action="store_true", help="only the training step with parts switched off")
    parser.add_argument("--hyper-connections", action="store_true",
                        help="only the fused hyper-connections against the library's forward (one connection, decoding)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {device.type} ({device_name(device)}) | dtype: float32 | threads: {args.threads} | torch {torch.__version__}")

    print()
    if args.breakdown:
        print_breakdown(device, args.batch, args.seq_len, args.repeats)
        return
    if args.hyper_connections:
        print_hyper_connections(device, args.batch, args.seq_len, max(args.repeats, 9))
        return
    names = ("mac", "mag", "mal", "lmm", "window") if args.only_segment else (args.model,)
    print_segment_cost(names, device)
    print()
    print_decoding_ops(names, device)
    if args.only_segment:
        return

    torch.manual_seed(0)
    model = train_model(device, args.model, args.ff_mult, args.segment_len, args.chunk_size)
    params = sum(p.numel() for p in model.parameters())
    memory = next((m for m in model.modules() if isinstance(m, NeuralMemory)), None)
    shape = ", ".join(([f"segment {model.segment_len}"] if hasattr(model, "segment_len") else [])
                      + ([f"chunk {memory.chunk_size}"] if memory is not None else []))
    print(f"model: {args.model}, train_mac.py base size ({shape}), {params / 1e6:.1f}M parameters")

    if not args.skip_train:
        ids = torch.randint(0, 256, (args.batch, args.seq_len + 1), device=device)

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, return_loss=True).backward()

        seconds = median_time(step, device, args.repeats)
        tokens = args.batch * args.seq_len
        print(f"\ntraining step (forward+backward), batch {args.batch} x {args.seq_len}")
        print(f"  {seconds:.2f} s  ({tokens / seconds:,.0f} tokens/s)")
        if device.type == "cuda":  # the same step replayed from one CUDA graph (train_mac.py's default on CUDA)
            graphed = GraphedLoss(model, torch.zeros_like(ids))

            def graphed_step():
                model.zero_grad(set_to_none=False)
                graphed(ids)

            seconds = median_time(graphed_step, device, args.repeats)
            print(f"  {seconds:.3f} s  ({tokens / seconds:,.0f} tokens/s) replayed from a CUDA graph "
                  f"(GraphedLoss; warm-up and capture {graphed.capture_seconds:.1f} s)")
            del graphed
            model.zero_grad(set_to_none=True)

    model.eval()
    graphs = device.type == "cuda"
    print("\ndecoding: time per generated token after a context of n tokens (cached"
          + ("; and replayed from CUDA graphs, GraphDecoder, after capturing one per kind of step)" if graphs else ")"))
    print(f"{'context':>8}  {'ms/token':>9}" + (f"  {'graphs':>9}  {'captures':>8}  {'capture s':>9}" if graphs else ""))
    per_token = {}
    for context in map(int, args.decode_contexts.split(",")):
        prompt = torch.randint(0, 256, (1, context), device=device)
        with torch.no_grad():
            _, cache = model(prompt, return_cache=True)
            token = prompt[:, -1:]
            steps = 64

            def decode(step=lambda t, c: model(t, cache=c, return_cache=True)):
                c = cache
                for _ in range(steps):
                    _, c = step(token, c)

            seconds = median_time(decode, device, args.repeats) / steps
            row = f"{context:>8}  {seconds * 1e3:>9.2f}"
            if graphs:
                decoder = GraphDecoder(model)
                start = time.perf_counter()
                decode(decoder)  # captures a graph for each kind of step it meets
                torch.cuda.synchronize()
                capture = time.perf_counter() - start
                graphed = median_time(lambda: decode(decoder), device, args.repeats) / steps
                row += f"  {graphed * 1e3:>9.3f}  {decoder.captures:>8}  {capture:>9.1f}"
        per_token[context] = seconds
        print(row)
    contexts = sorted(per_token)
    ratio = per_token[contexts[-1]] / per_token[contexts[0]]
    print(f"ratio {contexts[-1]} / {contexts[0]}: {ratio:.2f} (bar: <= 1.5)")


if __name__ == "__main__":
    main()
