"""Long-range recall: does the memory remember what lies beyond the attention window?

    python benchmarks/recall.py                       # all five models, default setting
    python benchmarks/recall.py --models mac,window   # a subset
    python benchmarks/recall.py --merge a/results.json b/results.json   # one table from runs of subsets
    python benchmarks/recall.py --models mac,window --bare --lr 1e-3 --steps 600   # as a new user would

The task. The vocabulary has filler tokens, key tokens, value tokens and a query marker. A
sequence holds `pairs` facts `key value` (distinct keys, values drawn independently), then
random filler, then one query `marker key value` per fact in a random order, then filler up to
`seq_len`. The model is trained (and scored) only on the answer tokens: the value after
`marker key`, predicted from the logits one position earlier. The distance of a query is the
number of tokens from the fact's value to the query's answer. Training draws the gap between
facts and queries uniformly, so distances run from a few tokens to nearly `seq_len`, and
randomises where the facts sit against the segment boundaries.

Evaluation draws fresh sequences (another seed) at fixed distances of 1, 2, 4, 8 ... attention
windows (every query of a sequence at least that far from its fact) for two settings: one
fact (needle in a haystack) and `pairs` facts (multi-query associative recall). Accuracy is
argmax over the whole vocabulary. Values are drawn uniformly and independently of everything
else, so a model that cannot see the fact is right with probability `1 / num_values` (chance).

The models share width, depth, heads, window and training: MAC, MAG, MAL (attention + neural
memory), LMM (neural memory only) and `window`, MAC with its memory layers off, i.e. block
attention over windows of `window` tokens with persistent tokens. No token sees a key beyond its
own window except through a memory, so `window` cannot do better than chance at one window and
beyond. Results of one model do not depend on which others run (fixed seeds).

Defaults, and why: every model runs the library's own defaults (the default memory network
`ResidualNormMemory`, momentum and forgetting on, 1 memory head, chunk 16, and for MAC
`min(16, window)`); `--memory-model linear`, `--no-momentum`, `--no-value-norm`, `--max-lr` and
the other memory flags are there to compare against them. Peak learning rate 1e-2, except MAC at
3e-3: it learns only in a narrow window (at 1e-2 it stayed at chance for hundreds of steps; see
docs/recall.md for the runs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import titans_pytorch
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import titans_pytorch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import device_name, print_table  # noqa: E402  - the sibling script's helpers

ALL_MODELS = ("mac", "mag", "mal", "lmm", "window")
MODEL_CLASSES = {
    "mac": titans_pytorch.MemoryAsContextTransformer,
    "mag": titans_pytorch.MemoryAsGateTransformer,
    "mal": titans_pytorch.MemoryAsLayerTransformer,
    "lmm": titans_pytorch.MemoryTransformer,
    "window": titans_pytorch.MemoryAsContextTransformer,  # with its memory layers off
}


# ---------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class RecallTask:
    """Token layout: filler `[0, F)`, keys `[F, F+K)`, values `[F+K, F+K+V)`, marker `F+K+V`."""

    num_filler: int = 32
    num_keys: int = 32
    num_values: int = 32
    pairs: int = 4
    seq_len: int = 256

    @property
    def num_tokens(self) -> int:
        return self.num_filler + self.num_keys + self.num_values + 1

    @property
    def marker(self) -> int:
        return self.num_filler + self.num_keys + self.num_values

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    def max_gap(self, pairs: int) -> int:
        return self.seq_len - 5 * pairs

    def sample(self, batch: int, generator: torch.Generator, pairs: int | None = None, distance: int | None = None):
        """`batch` sequences. `pairs`: facts per sequence (None: uniform in 1..self.pairs).
        `distance`: every query's answer at least this many tokens after its fact's value, the
        nearest exactly that far (None: a uniform gap). Returns ids `(batch, seq_len)`, the
        answer targets `(batch, seq_len)` aligned with the logits that predict them, a mask of
        those positions, and each answer's distance (0 elsewhere)."""
        ids = torch.randint(0, self.num_filler, (batch, self.seq_len), generator=generator)
        targets = torch.zeros(batch, self.seq_len, dtype=torch.long)
        mask = torch.zeros(batch, self.seq_len, dtype=torch.bool)
        distances = torch.zeros(batch, self.seq_len, dtype=torch.long)
        for b in range(batch):
            p = pairs if pairs is not None else int(torch.randint(1, self.pairs + 1, (1,), generator=generator))
            if distance is None:
                gap = int(torch.randint(0, self.max_gap(p) + 1, (1,), generator=generator))
            else:
                # nearest query: the last fact asked first, answer = value + 2 + gap + 1
                gap = distance - 3
                if not 0 <= gap <= self.max_gap(p):
                    raise ValueError(f"distance {distance} does not fit {p} facts in {self.seq_len} tokens")
            slack = self.max_gap(p) - gap
            start = int(torch.randint(0, slack + 1, (1,), generator=generator))
            keys = self.num_filler + torch.randperm(self.num_keys, generator=generator)[:p]
            values = self.num_filler + self.num_keys + torch.randint(0, self.num_values, (p,), generator=generator)
            fact_pos = start + 2 * torch.arange(p)
            ids[b, fact_pos], ids[b, fact_pos + 1] = keys, values
            order = torch.randperm(p, generator=generator)
            if distance is not None:
                # put the last fact first so the nearest distance is exactly `distance`
                last = int((order == p - 1).nonzero())
                order[[0, last]] = order[[last, 0]]
            query_pos = start + 2 * p + gap + 3 * torch.arange(p)
            ids[b, query_pos] = self.marker
            ids[b, query_pos + 1] = keys[order]
            ids[b, query_pos + 2] = values[order]
            targets[b, query_pos + 1] = values[order]
            mask[b, query_pos + 1] = True
            distances[b, query_pos + 1] = query_pos + 2 - (fact_pos[order] + 1)
        return ids, targets, mask, distances


def answer_loss(logits, targets, mask):
    return F.cross_entropy(logits[mask].float(), targets[mask])


# ---------------------------------------------------------------------------- the models


MEMORY_OPTIONS = {  # flag -> NeuralMemory argument; a flag left unset leaves the library's default
    "chunk": "chunk_size", "mem_heads": "heads", "mem_dim_head": "dim_head", "max_lr": "max_lr",
    "init_lr": "init_lr", "init_momentum": "init_momentum", "init_forget": "init_forget", "momentum": "momentum",
    "value_norm": "value_l2norm",
}


def memory_kwargs(args):
    """The NeuralMemory arguments given on the command line (none by default: the library's defaults)."""
    return {name: getattr(args, flag) for flag, name in MEMORY_OPTIONS.items() if getattr(args, flag) is not None}


def memory_model(args, dim):
    """The memory network on `dim` features per memory head (None: the library's default)."""
    if args.memory_model == "default":
        return None  # ResidualNormMemory, x + LN(mlp(x))
    if args.memory_model == "linear":
        return titans_pytorch.LinearMemory(dim)
    return titans_pytorch.MemoryMLP(dim, depth=2, expansion=args.mem_expansion)


def build_model(name, args, task):
    """The model called `name` (one of ALL_MODELS)."""
    cls = MODEL_CLASSES[name]
    if args.bare:  # as a new user writes it: every argument but the sizes left to the library
        if name == "lmm":
            return cls(num_tokens=task.num_tokens, dim=args.dim, depth=args.depth)
        extra = dict(neural_memory_layers=()) if name == "window" else {}
        return cls(num_tokens=task.num_tokens, dim=args.dim, depth=args.depth, segment_len=args.window, **extra)
    common = dict(num_tokens=task.num_tokens, dim=args.dim, depth=args.depth, ff_mult=args.ff_mult,
                  num_residual_streams=args.streams)
    if name != "window":
        heads = args.mem_heads or 1
        common["neural_memory_model"] = memory_model(args, args.mem_dim_head or args.dim // heads)
    if name == "lmm":
        return cls(**common, neural_memory_kwargs=memory_kwargs(args))
    layers = None if args.memory_layers == "all" else tuple(int(x) for x in args.memory_layers.split(",") if x)
    attention = dict(segment_len=args.window, num_persist_mem_tokens=args.persist, heads=args.heads,
                     dim_head=args.dim_head)
    if name == "window":
        return cls(**common, **attention, neural_memory_layers=())
    extra = dict(num_longterm_mem_tokens=args.longterm) if name == "mac" else {}
    return cls(**common, **attention, **extra, neural_memory_layers=layers, neural_memory_kwargs=memory_kwargs(args))


# ---------------------------------------------------------------------------- train / evaluate


def model_lrs(args):
    lrs = {}
    for item in filter(None, (x.strip() for x in args.model_lr.split(","))):
        name, _, value = item.partition("=")
        if name not in ALL_MODELS or not value:
            raise SystemExit(f"--model-lr wants name=lr items with names from {ALL_MODELS}, got {item!r}")
        lrs[name] = float(value)
    return lrs


def train(model, task, args, lr, log_prefix=""):
    generator = torch.Generator().manual_seed(args.seed)
    if args.bare:  # plain AdamW at a constant rate: no warmup, no decay, no clipping
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if args.bare:
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    history, running, start = [], None, time.perf_counter()
    for step in range(args.steps):
        ids, targets, mask, _ = task.sample(args.batch, generator)
        logits = model(ids)
        loss = answer_loss(logits, targets, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not args.bare:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step == args.steps - 1:
            history.append((step + 1, running))
            print(f"{log_prefix}step {step + 1:5d}  answer loss {running:.3f}  ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return history, time.perf_counter() - start


@torch.no_grad()
def evaluate(model, task, args, pairs, windows):
    """Answer accuracy at each distance (in windows) on fresh sequences."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed + 1_000_003)
    accuracy = {}
    for w in windows:
        correct = total = 0
        remaining = args.eval_sequences
        while remaining > 0:
            n = min(args.batch, remaining)
            ids, targets, mask, _ = task.sample(n, generator, pairs=pairs, distance=w * args.window)
            predictions = model(ids).argmax(dim=-1)
            correct += (predictions[mask] == targets[mask]).sum().item()
            total += mask.sum().item()
            remaining -= n
        accuracy[w] = correct / total
    model.train()
    return accuracy


# ---------------------------------------------------------------------------- main


def plot(results, windows, chance, labels, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipping the plot {path}")
        return False
    settings = list(next(iter(results.values()))["accuracy"])
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), sharey=True, squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for index, (name, result) in enumerate(results.items()):
            acc = result["accuracy"][setting]
            # distinct markers and sizes: curves at 1.0 lie on top of each other
            ax.plot(windows, [acc[str(w)] for w in windows], marker="os^Dv"[index % 5], markersize=9 - 1.2 * index,
                    linestyle=("-", "--", ":", "-.")[index % 4], label=name)
        ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(windows, [str(w) for w in windows])
        ax.set_xlabel("distance from fact to query (attention windows)")
        ax.set_title(labels[setting])
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("answer accuracy")
    axes[0][-1].legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {','.join(ALL_MODELS)}")
    p.add_argument("--out", default="runs/recall", help="directory for results.json and recall.png")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    # task
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--pairs", type=int, default=8, help="facts per sequence (training: 1..pairs)")
    p.add_argument("--num-keys", type=int, default=16)
    p.add_argument("--num-values", type=int, default=16)
    p.add_argument("--num-filler", type=int, default=32)
    p.add_argument("--eval-windows", default="1,2,4,8", help="distances to score, in attention windows")
    p.add_argument("--eval-sequences", type=int, default=256, help="fresh sequences per distance and setting")
    # model
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--window", type=int, default=8, help="attention window = segment length")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=16)
    p.add_argument("--ff-mult", type=float, default=2.0)
    p.add_argument("--persist", type=int, default=4, help="persistent memory tokens")
    p.add_argument("--longterm", type=int, default=4, help="MAC's long-term memory tokens per segment")
    p.add_argument("--streams", type=int, default=1, help="residual streams (hyper-connections; 1 = off)")
    p.add_argument("--memory-layers", default="all", help="'all' or 1-indexed layers, e.g. '1' or '1,2'")
    # neural memory
    # neural memory: every flag unset by default, leaving the library's defaults
    p.add_argument("--chunk", type=int, help="memory chunk size (library default: 16, and for MAC min(16, window))")
    p.add_argument("--mem-heads", type=int, help="memory heads (library default: 1)")
    p.add_argument("--mem-dim-head", type=int, help="memory head width (library default: dim / heads)")
    p.add_argument("--max-lr", type=float, help="the memory's largest inner learning rate")
    p.add_argument("--init-lr", type=float)
    p.add_argument("--init-momentum", type=float)
    p.add_argument("--init-forget", type=float)
    p.add_argument("--momentum", action=argparse.BooleanOptionalAction, help="the memory's momentum (library: on)")
    p.add_argument("--value-norm", action=argparse.BooleanOptionalAction,
                   help="L2-normalised memory values (library: on)")
    p.add_argument("--memory-model", choices=("default", "linear", "mlp"), default="default",
                   help="default: the library's x + LN(mlp(x)); linear: one matrix; mlp: 2-layer MLP without norm")
    p.add_argument("--mem-expansion", type=float, default=2.0, help="hidden width factor of --memory-model mlp")
    # training
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate")
    p.add_argument("--model-lr", default="mac=3e-3",
                   help="per-model peak learning rates overriding --lr, e.g. 'mac=3e-3,mag=1e-2' ('' for none)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--bare", action="store_true",
                   help="as a new user would: build each model from num_tokens, --dim, --depth and --window alone "
                        "(every other argument the library's default; the attention and memory flags are ignored) and "
                        "train with plain AdamW at a constant --lr (no warmup, decay or clipping; --model-lr ignored)")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="train nothing: one table and plot (in --out) from runs of different --models")
    return p.parse_args(argv)


def run(args):
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {ALL_MODELS}")
    windows = [int(w) for w in args.eval_windows.split(",")]
    task = RecallTask(args.num_filler, args.num_keys, args.num_values, args.pairs, args.seq_len)
    for w in windows:
        if w * args.window - 3 > task.max_gap(args.pairs):
            raise SystemExit(f"distance {w} windows does not fit in --seq-len {args.seq_len}")
    if args.chunk and "mac" in names and args.window % args.chunk:
        raise SystemExit(f"--chunk ({args.chunk}) must divide --window ({args.window}) for MAC")
    lrs = {} if args.bare else model_lrs(args)
    settings = {"needle": 1, "mqar": args.pairs}
    labels = {"needle": "needle in a haystack (1 fact)", "mqar": f"multi-query associative recall ({args.pairs} facts)"}

    print(f"device: cpu ({device_name(torch.device('cpu'))}) | dtype: float32 | threads: {torch.get_num_threads()}"
          f" | torch {torch.__version__}")
    print(f"task: {task.num_tokens} tokens ({args.num_filler} filler, {args.num_keys} keys, {args.num_values} values,"
          f" 1 marker), seq_len {args.seq_len}, window {args.window}, 1..{args.pairs} facts per training sequence")
    print(f"chance (1 / num_values): {task.chance:.4f}")
    overrides = "".join(f", {n} {lr}" for n, lr in lrs.items() if n in names)
    if args.bare:
        print(f"models: dim {args.dim}, depth {args.depth}, segment_len {args.window}, every other argument the library's")
        print(f"training: {args.steps} steps x batch {args.batch}, plain AdamW at a constant lr {args.lr}, loss on answer"
              f" tokens only\n")
    else:
        print(f"models: dim {args.dim}, depth {args.depth}, attention window {args.window} ({args.heads} heads of"
              f" {args.dim_head}, {args.persist} persistent tokens), memory network: {args.memory_model},"
              f" NeuralMemory arguments: {memory_kwargs(args) or 'the library defaults'}")
        print(f"training: {args.steps} steps x batch {args.batch}, AdamW peak lr {args.lr}{overrides},"
              f" loss on answer tokens only\n")

    results = {}
    for name in names:
        torch.manual_seed(args.seed)
        model = build_model(name, args, task)
        params = sum(p.numel() for p in model.parameters())
        lr = lrs.get(name, args.lr)
        print(f"== {name} ({type(model).__name__}, {params:,} parameters, lr {lr})")
        history, seconds = train(model, task, args, lr, log_prefix=f"{name}: ")
        accuracy = {setting: evaluate(model, task, args, pairs, windows) for setting, pairs in settings.items()}
        results[name] = dict(
            cls=type(model).__name__, params=params, lr=lr, train_seconds=seconds, loss_history=history,
            accuracy={s: {str(w): a for w, a in acc.items()} for s, acc in accuracy.items()},
        )
        for setting, acc in accuracy.items():
            print(f"{name} {setting}: " + "  ".join(f"{w} windows {a:.3f}" for w, a in acc.items()))
        print(flush=True)

    if not results:
        raise SystemExit("no model could be built")
    payload = dict(
        args=vars(args), task=asdict(task), chance=task.chance, windows=windows, settings=settings, labels=labels,
        device=f"cpu ({device_name(torch.device('cpu'))})", threads=torch.get_num_threads(),
        torch=torch.__version__, results=results,
    )
    report(payload, Path(args.out))
    return payload


def report(payload, out: Path):
    """Print the accuracy tables of `payload` (a results.json's content), write it to
    `out/results.json` and plot it to `out/recall.png`."""
    results, windows, window = payload["results"], payload["windows"], payload["args"]["window"]
    for setting in payload["settings"]:
        print(f"answer accuracy, {payload['labels'][setting]}, by distance in windows of {window} tokens"
              f" (chance {payload['chance']:.4f})")
        rows = [(name, f"{r['params']:,}", f"{r['train_seconds']:.0f}",
                 *(f"{r['accuracy'][setting][str(w)]:.3f}" for w in windows)) for name, r in results.items()]
        print_table(("model", "params", "train s", *(f"{w}w ({w * window} tok)" for w in windows)), rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {out / 'results.json'}")
    plot(results, windows, payload["chance"], payload["labels"], out / "recall.png")


# settings that must agree for runs to be merged into one table
MERGE_KEYS = ("bare", "seed", "seq_len", "pairs", "num_keys", "num_values", "num_filler", "eval_windows", "eval_sequences",
              "dim", "depth", "window", "heads", "dim_head", "ff_mult", "persist", "longterm", "streams", "steps", "batch")


def merge(paths, out: Path):
    """One table and plot from the results.json of runs of different `--models` (for example
    one per CPU core): a model's results do not depend on which others ran."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    first = payloads[0]
    for path, other in zip(paths[1:], payloads[1:]):
        setting = lambda payload, key: payload["args"].get(key, False if key == "bare" else None)  # noqa: E731  (older files lack "bare")
        differ = [k for k in MERGE_KEYS if setting(other, k) != setting(first, k)]
        if differ:
            raise SystemExit(f"--merge: {path} differs from {paths[0]} in {', '.join(differ)}")
    merged = dict(first, results={}, merged_from=[str(p) for p in paths])
    for path, other in zip(paths, payloads):
        for name, result in other["results"].items():
            if name in merged["results"]:
                raise SystemExit(f"--merge: {name} appears in more than one file ({path})")
            merged["results"][name] = dict(result, args=other["args"])
    report(merged, out)
    return merged


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.merge:
        merge(arguments.merge, Path(arguments.out))
    else:
        run(arguments)
