"""Compare MAC, MAG, MAL and LMM trained the same way: parameters, training tokens/s and
validation bits per byte after the same number of steps on the same data.

Each model is trained by `train_mac.py --model NAME` (same preset, steps, seed and data:
enwik8 when present, else the offline corpus), one after the other, and the table is read
from each run's metrics.jsonl.

    python benchmarks/compare_variants.py --steps 300 --threads 1
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench_memory import print_table  # the sibling script's table helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_mac import build_model  # noqa: E402  (the trainer's own model builder)
MODELS = ("mac", "mag", "mal", "lmm")


def run(model, args, out):
    command = [sys.executable, str(ROOT / "train_mac.py"), "--model", model, "--preset", args.preset,
               "--steps", str(args.steps), "--seed", str(args.seed), "--out", str(out), "--device", "cpu", "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    subprocess.run(command + args.extra, check=True, env=env, cwd=ROOT)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train_mac.py flags")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")

    rows = []
    for model in models:
        out = Path(args.out) / model
        if (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()  # a fresh run, not an append to an old one
        records = run(model, args, out)
        valid = [r for r in records if "valid_bpb" in r]
        params = sum(p.numel() for p in build_model(model, args.preset).parameters())
        rows.append([model, f"{params / 1e6:.2f}M", f"{records[-1]['tokens_per_s']:.0f}",
                     f"{valid[-1]['valid_bpb']:.3f}"])
    print(f"\ndevice: cpu | dtype: float32 | threads: {args.threads} | preset {args.preset}, {args.steps} steps, seed {args.seed}")
    print_table(["model", "parameters", "training tokens/s", f"validation bits/byte after {args.steps} steps"], rows)


if __name__ == "__main__":
    main()
