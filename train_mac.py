"""Train a MemoryAsContextTransformer on enwik8 (bytes), or on an offline corpus.

    python train_mac.py                         # enwik8 at data/enwik8.gz if present, else offline corpus
    python train_mac.py --preset tiny --steps 300
    python train_mac.py --data path/to/enwik8   # raw, .gz or the Hutter .zip

enwik8 uses the standard 90M / 5M / 5M split. Without it, the source text of the Python
standard library on this machine is split deterministically into train / validation.
Validation is reported in bits per byte (a uniform guess is 8.0).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import random
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import torch
from tqdm import tqdm

from titans_pytorch import MemoryAsContextTransformer

PRESETS = {
    # dim, depth, segment_len, heads, dim_head, memory layers, memory heads/dim_head, chunk
    "tiny": dict(dim=128, depth=4, segment_len=32, heads=4, dim_head=32, layers=(2, 4), mem_heads=2, mem_dim_head=32, chunk=8, seq_len=256, batch=8),
    "base": dict(dim=384, depth=8, segment_len=32, heads=8, dim_head=64, layers=(2, 4, 6), mem_heads=4, mem_dim_head=64, chunk=4, seq_len=512, batch=4),
}


def load_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            return f.read()
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            return z.read(z.namelist()[0])
    return path.read_bytes()


def offline_corpus() -> bytes:
    """The Python standard library's source, in a fixed order: on every machine, no network."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return b"".join(p.read_bytes() for p in files)


def load_data(path: str | None):
    candidate = Path(path) if path else Path("data/enwik8.gz")
    if candidate.exists():
        data = load_bytes(candidate)
        if len(data) >= 100_000_000:
            return "enwik8", data[:90_000_000], data[90_000_000:95_000_000]
        split = int(len(data) * 0.95)
        return candidate.name, data[:split], data[split:]
    if path:
        raise SystemExit(f"--data {path}: no such file")
    print("enwik8 not found at data/enwik8.gz: training on the offline corpus (Python standard library source)")
    data = offline_corpus()
    split = int(len(data) * 0.95)
    return "python-stdlib", data[:split], data[split:]


def batches(data: bytes, batch: int, seq_len: int, generator: torch.Generator):
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    while True:
        starts = torch.randint(0, len(tensor) - seq_len - 1, (batch,), generator=generator)
        yield torch.stack([tensor[s : s + seq_len + 1] for s in starts.tolist()]).long()


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_atomically(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def validate(model, data, batch, seq_len, device, batches_to_run=8):
    model.eval()
    generator = torch.Generator().manual_seed(1234)  # the same validation batches every time
    stream = batches(data, batch, seq_len, generator)
    losses = [model(next(stream).to(device), return_loss=True).item() for _ in range(batches_to_run)]
    model.train()
    return sum(losses) / len(losses) / math.log(2)  # nats per byte -> bits per byte


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="base")
    parser.add_argument("--data", default=None)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=0, help="0: only at the end")
    parser.add_argument("--out", default="runs/mac")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    batch = args.batch_size or preset["batch"]
    seq_len = args.seq_len or preset["seq_len"]
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    name, train_data, valid_data = load_data(args.data)
    model = MemoryAsContextTransformer(
        num_tokens=256, dim=preset["dim"], depth=preset["depth"], segment_len=preset["segment_len"],
        num_persist_mem_tokens=4, num_longterm_mem_tokens=4, heads=preset["heads"], dim_head=preset["dim_head"],
        neural_memory_layers=preset["layers"],
        neural_memory_kwargs=dict(chunk_size=preset["chunk"], heads=preset["mem_heads"], dim_head=preset["mem_dim_head"]),
    ).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"data: {name} ({len(train_data):,} train / {len(valid_data):,} validation bytes) | "
          f"model: {args.preset}, {params / 1e6:.2f}M parameters | device: {device}")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    stream = batches(train_data, batch, seq_len, torch.Generator().manual_seed(args.seed))
    metrics = open(out / "metrics.jsonl", "a")
    progress = tqdm(range(args.steps), desc="training", dynamic_ncols=True)
    start, tokens = time.time(), 0
    valid_bpb = float("nan")
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss_sum = 0.0
        for _ in range(args.grad_accum):
            loss = model(next(stream).to(device), return_loss=True)
            (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        if not math.isfinite(loss_sum):
            print(f"\nstep {step}: loss is {loss_sum}; stopping. The last good checkpoint is {out / 'checkpoint.pt'}")
            sys.exit(1)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch * seq_len * args.grad_accum
        train_bpb = loss_sum / math.log(2)
        record = {"step": step + 1, "train_bpb": train_bpb, "tokens_per_s": tokens / (time.time() - start)}
        last = step + 1 == args.steps
        if (step + 1) % args.validate_every == 0 or last:
            valid_bpb = validate(model, valid_data, batch, seq_len, device)
            record["valid_bpb"] = valid_bpb
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                             "config": vars(args)}, out / "checkpoint.pt")
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        progress.set_postfix(bpb=f"{train_bpb:.3f}", valid=f"{valid_bpb:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if (args.sample_every and (step + 1) % args.sample_every == 0) or last:
            prompt = next(stream)[:1, :64].to(device)
            sampled = model.sample(prompt, 64 + 128, temperature=0.8)
            text = lambda t: bytes(t.tolist()).decode("utf-8", errors="replace")  # noqa: E731
            print(f"\n--- prompt ---\n{text(prompt[0])}\n--- sample ---\n{text(sampled[0])}\n")
    metrics.close()
    print(f"done: validation bits per byte {valid_bpb:.3f} after {args.steps} steps; metrics, checkpoint in {out}")


if __name__ == "__main__":
    main()
