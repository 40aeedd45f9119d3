"""This library's MAC against the published titans-pytorch 0.5.5, same run, same machine.

Both are timed on a forward+backward step of their train_mac.py model (dim 384, depth 8, segment 32,
memory on layers 2, 4 and 6 with 4 heads of 64 and chunk 4; 0.5.5 with its own train_mac.py
settings, CPU-compatible: no flex attention, no accelerated scan). Each runs in its own process,
since both packages are called `titans_pytorch`. Install 0.5.5 apart from this checkout first:

    pip install --no-deps --target /tmp/titans055 titans-pytorch==0.5.5 assoc-scan axial-positional-embedding
    python benchmarks/compare_published.py --peer-path /tmp/titans055 --threads 2 [--rounds 3]

`--checkout PATH` times another checkout of this library instead of 0.5.5 (before and after a change:
`git worktree add /tmp/before HEAD~1`), with `--rounds` pairs of runs alternating on a noisy machine.

`--keep-freed-memory` runs both with glibc's malloc told to keep freed memory instead of handing it
back to the kernel (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`): by default every block above
32 MiB, and the heap's top beyond a threshold, is returned when freed and page-faulted back in when
used again, which on our development VMs costs this library's step much more than the published one's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

IMPORTS = """
import json, resource, statistics, sys, time
import torch
"""

STEP = """
torch.set_num_threads({threads})
torch.manual_seed(0)
model = build()
ids = torch.randint(0, 256, ({batch}, {seq_len} + 1))
def step():
    model.zero_grad(set_to_none=True)
    model(ids, return_loss=True).backward()
step()
times, faults = [], []
for _ in range({repeats}):
    start, start_faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start_faults)
import titans_pytorch
print(json.dumps(dict(seconds=statistics.median(times), faults=statistics.median(faults),
                      params=sum(p.numel() for p in model.parameters()), package=titans_pytorch.__file__)))
"""

OURS = """
sys.path.insert(0, {root!r})
from train_mac import PRESETS, build_model
def build():
    return build_model("mac", PRESETS["base"]["arch"])
"""

PEER = """
from titans_pytorch import MemoryAsContextTransformer, MemoryMLP
def build():  # 0.5.5's train_mac.py model, without its CUDA-only options
    return MemoryAsContextTransformer(
        num_tokens=256, dim=384, depth=8, segment_len=32, num_persist_mem_tokens=4, num_longterm_mem_tokens=4,
        neural_memory_layers=(2, 4, 6), neural_memory_segment_len=4, neural_memory_batch_size=128,
        neural_mem_gate_attn_output=False, neural_mem_weight_residual=True, neural_memory_qkv_receives_diff_views=True,
        use_flex_attn=False, sliding_window_attn=True, neural_memory_model=MemoryMLP(dim=64, depth=2),
        neural_memory_kwargs=dict(dim_head=64, heads=4, attn_pool_chunks=True, qk_rmsnorm=True, momentum=True,
                                  momentum_order=1, default_step_transform_max_lr=1e-1, use_accelerated_scan=False,
                                  per_parameter_lr_modulation=True, spectral_norm_surprises=True))
"""


KEEP_FREED_MEMORY = dict(MALLOC_MMAP_THRESHOLD_=str(1 << 32), MALLOC_TRIM_THRESHOLD_=str(1 << 36))


def timed(prelude, args, pythonpath=None):
    code = IMPORTS + prelude + STEP.format(threads=args.threads, batch=args.batch, seq_len=args.seq_len, repeats=args.repeats)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **(KEEP_FREED_MEMORY if args.keep_freed_memory else {}))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cwd = "/" if pythonpath else ROOT  # the peer must not see this checkout's package
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    peers = parser.add_mutually_exclusive_group(required=True)
    peers.add_argument("--peer-path", help="where titans-pytorch 0.5.5 is installed (a PYTHONPATH)")
    peers.add_argument("--checkout", help="instead, another checkout of this library (a `git worktree` of an earlier "
                                          "commit, say): its train_mac.py model, timed the same way")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="run both with glibc malloc keeping freed memory (see above)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="pairs of runs, each pair close in time, the peer first in odd rounds and this library "
                             "in even ones: on a noisy machine the ratio within a pair moves less than either "
                             "timing (default 1)")
    args = parser.parse_args()

    other = Path(args.checkout).resolve() if args.checkout else None
    peer_name = f"the checkout at {other}" if other else "titans-pytorch 0.5.5"
    def run_peer():
        if other:
            peer = timed(OURS.format(root=str(other)), args, pythonpath=str(other))
        else:
            peer = timed(PEER, args, pythonpath=args.peer_path)
        if str(ROOT) in peer["package"]:
            raise SystemExit(f"the peer run imported this checkout ({peer['package']})")
        return peer

    pairs = []
    for round_ in range(args.rounds):
        # which runs first alternates: on our development VMs the second of two runs in a row is often
        # the slower (the first leaves the second pages to fault back in, say), which would favour one side
        if round_ % 2 == 0:
            peer = run_peer()
            ours = timed(OURS.format(root=str(ROOT)), args)
        else:
            ours = timed(OURS.format(root=str(ROOT)), args)
            peer = run_peer()
        pairs.append((ours, peer))
    print(f"forward+backward, batch {args.batch} x {args.seq_len}, cpu, float32, {args.threads} thread(s), "
          f"median of {args.repeats} steps a run" + (", glibc malloc keeping freed memory" if args.keep_freed_memory else ""))
    for round_, (ours, peer) in enumerate(pairs, 1):
        if args.rounds > 1:
            print(f" round {round_}:")
        for name, run in (("this library", ours), (peer_name, peer)):
            print(f"  {name}: {run['seconds']:.2f} s ({run['params'] / 1e6:.1f}M parameters), "
                  f"{run['faults'] / 1e3:.0f}K minor page faults a step")
        print(f"  ratio: {peer['seconds'] / ours['seconds']:.2f}x")
    if args.rounds > 1:
        ratios = sorted(peer["seconds"] / ours["seconds"] for ours, peer in pairs)
        print(f"median ratio of {args.rounds} rounds: {statistics.median(ratios):.2f}x "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
