"""Compare MAC, MAG, MAL, LMM and the window-only baseline trained the same way: parameters,
training tokens/s and validation bits per byte after the same number of steps, over seeds.

Each run is `train_mac.py --model NAME --seed S` (same preset, steps and data: enwik8 when
present, else the offline corpus), one after the other (or `--jobs` at a time, each on
`--threads` threads); the table is read from each run's metrics.jsonl. `window` is MAC with no
memory layer: segment attention with persistent tokens only, the baseline a memory must beat.

    python benchmarks/compare_variants.py --steps 1000 --seeds 0,1,2 --jobs 2
    python benchmarks/compare_variants.py --models mac,window --steps 300 -- --sample-len 0
    python benchmarks/compare_variants.py --steps 1000 --jobs 2 --resume   # continue after a stop

Validation is reported as mean and spread (smallest to largest) over the seeds; results.json
in --out keeps every run's figures.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_memory import print_table  # the sibling script's table helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from train_mac import build_model  # noqa: E402  (the trainer's own model builder)

MODELS = ("mac", "mag", "mal", "lmm", "window")


def run(model, seed, args, out):
    """Train one model with one seed; returns its metrics records."""
    resume = args.resume and (out / "checkpoint.pt").exists()
    if not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run, not an append to an old one
    command = [sys.executable, str(ROOT / "train_mac.py"), "--model", model, "--preset", args.preset,
               "--steps", str(args.steps), "--seed", str(seed), "--out", str(out), "--device", "cpu",
               "--threads", str(args.threads), "--resume" if resume else "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = out.parent / f"{out.name}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if resume else "w") as handle:
        subprocess.run(command + args.extra, check=True, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(records):
    valid = [r for r in records if "valid_bpb" in r]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    return {"valid_bpb": valid[-1]["valid_bpb"], "tokens_per_s": statistics.median(speeds)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--resume", action="store_true",
                        help="continue each run from its checkpoint in --out (a finished run is read back, not rerun); "
                             "train_mac.py refuses a checkpoint made with other settings")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more train_mac.py flags")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    runs = [(model, seed) for seed in seeds for model in models]  # seed by seed: every model's first seed comes first
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run, *key, args, Path(args.out) / f"{key[0]}-seed{key[1]}") for key in runs}
        results = {key: summary(future.result()) for key, future in futures.items()}

    rows = []
    for model in models:
        bpb = [results[model, seed]["valid_bpb"] for seed in seeds]
        speed = statistics.median(results[model, seed]["tokens_per_s"] for seed in seeds)
        params = sum(p.numel() for p in build_model(model, args.preset).parameters())
        rows.append([model, f"{params / 1e6:.2f}M", f"{speed:.0f}", f"{statistics.mean(bpb):.3f}",
                     f"{min(bpb):.3f} - {max(bpb):.3f}", " ".join(f"{b:.3f}" for b in bpb)])
    print(f"\ndevice: cpu | dtype: float32 | {args.jobs} run(s) at a time, {args.threads} thread(s) each | preset "
          f"{args.preset}, {args.steps} steps, seeds {args.seeds}")
    print_table(["model", "parameters", "training tokens/s (median)", f"validation bits/byte after {args.steps} steps",
                 "spread", "per seed"], rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "runs": [{"model": m, "seed": s, **results[m, s]} for m, s in runs]}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
