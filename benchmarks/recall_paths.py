"""Which path carries MAC's recall? Trains MAC as `recall.py` does (same flags, same seed, so the
same model), then scores multi-query recall at one distance with each of MAC's three ways of
reading the memory switched off in turn, and by query order.

    python benchmarks/recall_paths.py                 # MAC, recall.py's default setting
    python benchmarks/recall_paths.py --distance 4    # in attention windows
    python benchmarks/recall_paths.py --store-input   # control: the memory stores x, not x + Attn
    python benchmarks/recall_paths.py --keys-from-stored   # the earlier MAC: keys from x + Attn, not x

MAC reads its memory three ways: per-token retrieval `h_t = M_{s-1}(q_t)` and the long-term
tokens (both seen by attention), and the gated read `out = sigmoid(norm(Attn)) * norm(M(x))`.
A path is switched off by removing what it reads: retrieved tokens become zero vectors, and the
gated read's `M(x)` a constant vector (so the attention still passes through the gate, carrying
nothing from the memory); the memory still stores as before.

By query order: in the evaluation sequences the facts' queries come one after another, the first
asking the last fact. A model that recalls by key scores about the same at every query. One that
keeps only the set of values it saw (a "bag of values") and drops each value once its query has
been answered scores about `1 / (facts - i)` at query `i`: 1/8 first, 1 last.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recall  # noqa: E402  - the sibling benchmark: task, model, training

from bench_memory import device_name  # noqa: E402


@contextlib.contextmanager
def switched_off(model, per_token=False, longterm=False, gate=False):
    """Zero the chosen reads of every memory layer for the duration of the block."""
    saved = []
    for layer in model.layers:
        mixer = layer[1]
        memory = mixer.memory
        if memory is None:
            continue
        saved.append((memory, {name: memory.__dict__[name] for name in ("read", "forward") if name in memory.__dict__}))

        def read_off(state, x, queries, original=memory.read, longterm_tokens=mixer.longterm_queries, memory=memory):
            out = original(state, x, queries)
            # MAC reads the long-term tokens (when a segment starts) and the piece's tokens in one call,
            # long-term tokens first
            count = 0
            if longterm_tokens is not None and x.shape[1] >= longterm_tokens.shape[0]:
                normed = memory.norm(longterm_tokens.to(x.dtype))
                count = longterm_tokens.shape[0] if torch.equal(x[0, : longterm_tokens.shape[0]], normed) else 0
            out = out.clone()
            if longterm:
                out[:, :count] = 0
            if per_token:
                out[:, count:] = 0
            return out

        def forward_off(seq, state=None, return_state=False, original=memory.forward, **addressing):
            out, state = original(seq, state=state, return_state=True, **addressing)
            out = torch.ones_like(out) if gate else out  # normalised: the norm's scale, a constant
            return (out, state) if return_state else out

        memory.read, memory.forward = read_off, forward_off
    try:
        yield model
    finally:
        for memory, before in saved:  # the methods as they were (a control's, or the class's)
            del memory.read, memory.forward
            memory.__dict__.update(before)


@contextlib.contextmanager
def storing_layer_input(model):
    """A control, not MAC: each memory stores (and reads at) the mixer's input `x` instead of
    `x + Attn`, the way MAG, MAL and LMM do; the order the paper rules out for MAC."""
    handles = []
    for layer in model.layers:
        mixer = layer[1]
        if mixer.memory is None:
            continue
        last = {}
        handles.append(mixer.attention.to_out_proj.register_forward_hook(
            lambda module, args, out, last=last: last.__setitem__("attn", out)))
        handles.append(mixer.memory.register_forward_pre_hook(
            lambda module, args, last=last: (args[0] - last["attn"], *args[1:])))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def keys_from_stored(model):
    """The earlier MAC: each memory's keys and queries computed from what it stores, `x + Attn`,
    like its values, instead of from the tokens `x`."""
    patched = []
    for layer in model.layers:
        memory = layer[1].memory
        if memory is None:
            continue

        def forward(seq, state=None, return_state=False, key_seq=None, addresses=None, original=memory.forward):
            return original(seq, state=state, return_state=return_state)  # keys and queries from seq

        memory.forward = forward
        patched.append(memory)
    try:
        yield model
    finally:
        for memory in patched:
            del memory.forward


@torch.no_grad()
def accuracy_by_order(model, task, args, distance, sequences):
    """Overall accuracy and accuracy of the i-th query of each sequence (facts = args.pairs)."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed + 2_000_003)
    correct = torch.zeros(args.pairs)
    remaining = sequences
    while remaining > 0:
        n = min(args.batch, remaining)
        ids, targets, mask, _ = task.sample(n, generator, pairs=args.pairs, distance=distance)
        right = (model(ids).argmax(dim=-1) == targets) & mask
        # the answers of a sequence, in query order
        correct += torch.stack([right[b][mask[b]] for b in range(n)]).float().sum(0)
        remaining -= n
    by_order = correct / sequences
    return by_order.mean().item(), by_order.tolist()


def report(model, task, args, distance):
    """Print the accuracy table: each read switched off in turn, by query order."""
    cases = [
        ("all three reads", {}),
        ("no per-token retrieval", dict(per_token=True)),
        ("no long-term tokens", dict(longterm=True)),
        ("no gated read", dict(gate=True)),
        ("gated read only", dict(per_token=True, longterm=True)),
    ]
    print(f"\n{args.pairs} facts, every query >= {distance} windows ({distance * args.window} tokens) after its fact,"
          f" {args.eval_sequences} fresh sequences; chance {task.chance:.4f}")
    header = ("MAC with", "accuracy", *(f"query {i + 1}" for i in range(args.pairs)))
    rows = []
    for label, off in cases:
        with switched_off(model, **off):
            overall, by_order = accuracy_by_order(model, task, args, distance * args.window, args.eval_sequences)
        rows.append((label, f"{overall:.3f}", *(f"{a:.2f}" for a in by_order)))
    rows.append(("(bag of values: 1/(facts-i))", "", *(f"{1 / (args.pairs - i):.2f}" for i in range(args.pairs))))
    recall.print_table(header, rows)



def main(argv=None):
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--distance", type=int, default=4, help="in attention windows")
    controls = own.add_mutually_exclusive_group()
    controls.add_argument("--store-input", action="store_true", help="the control: memory on the layer input x")
    controls.add_argument("--keys-from-stored", action="store_true",
                          help="the earlier MAC: memory keys and queries from x + Attn instead of x")
    mine, rest = own.parse_known_args(argv)
    distance, store_input = mine.distance, mine.store_input
    args = recall.parse_args(["--models", "mac", *rest])  # everything else is recall.py's
    torch.set_num_threads(args.threads)
    task = recall.RecallTask(args.num_filler, args.num_keys, args.num_values, args.pairs, args.seq_len)
    lr = recall.model_lrs(args).get("mac", args.lr)
    print(f"device: cpu ({device_name(torch.device('cpu'))}) | dtype: float32 | threads: {torch.get_num_threads()}")
    torch.manual_seed(args.seed)
    model = recall.build_model("mac", args, task)
    control, what = contextlib.nullcontext(), "MAC"
    if store_input:
        control, what = storing_layer_input(model), "MAC storing its layer input x (control)"
    elif mine.keys_from_stored:
        control, what = keys_from_stored(model), "MAC with keys from x + Attn (the earlier MAC)"
    with control:
        print(f"training {what} as benchmarks/recall.py does: {args.steps} steps, lr {lr}")
        recall.train(model, task, args, lr, log_prefix="mac: ")
        report(model, task, args, distance)


if __name__ == "__main__":
    main()
