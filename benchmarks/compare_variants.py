"""Compare MAC, MAG, MAL, LMM and the window-only baseline trained the same way, and configurations
of them (`--config`): parameters, training tokens/s and minutes, and validation bits per byte after
the same number of steps, over seeds.

Each run is `train_mac.py --model NAME --seed S [the configuration's flags]` (same preset, steps
and data: enwik8 when present, else the offline corpus), one after the other (or `--jobs` at a
time, each on `--threads` threads); the table is read from each run's metrics.jsonl. `window` is
MAC with no memory layer: segment attention with persistent tokens only, the baseline a memory
must beat.

    python benchmarks/compare_variants.py --steps 1000 --seeds 0,1,2 --jobs 2
    python benchmarks/compare_variants.py --models mac,window --steps 300 -- --sample-len 0
    python benchmarks/compare_variants.py --steps 1000 --jobs 2 --resume   # continue after a stop
    python benchmarks/compare_variants.py --device cuda --preset base --models mac --seeds 0 --steps 300 \
        --config "segment 32, chunk 4=" --config "segment 128, chunk 16=--segment-len 128 --chunk-size 16"

Validation is reported as mean and spread (smallest to largest) over the seeds; results.json
in --out keeps every run's figures.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_memory import print_table  # the sibling script's table helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_mac  # noqa: E402  (the trainer's own flags and model builder)

MODELS = ("mac", "mag", "mal", "lmm", "window")


def run(model, config, seed, args, out):
    """Train one model in one configuration with one seed; returns its metrics records."""
    resume = args.resume and (out / "checkpoint.pt").exists()
    if not resume and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run, not an append to an old one
    command = [sys.executable, str(ROOT / "train_mac.py"), "--model", model, "--preset", args.preset,
               "--steps", str(args.steps), "--seed", str(seed), "--out", str(out), "--device", args.device,
               "--threads", str(args.threads), "--resume" if resume else "--overwrite"]
    if not resume:
        command += flags_for(model, args.configs[config])  # a resumed run takes them from its checkpoint
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    log = out.parent / f"{out.name}.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if resume else "w") as handle:
        subprocess.run(command + args.extra, check=True, env=env, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(records):
    valid = [r for r in records if "valid_bpb" in r]
    steps = [r for r in records if "tokens_per_s" in r]
    seconds, tokens = 0.0, 0
    for record in steps:  # each step's time from its tokens and rate
        seconds += (record["tokens"] - tokens) / record["tokens_per_s"]
        tokens = record["tokens"]
    return {"valid_bpb": valid[-1]["valid_bpb"], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "minutes": seconds / 60, "tokens": tokens}


def parameters(model, preset, flags):
    """The parameter count of `model` with the preset and a configuration's flags."""
    args = train_mac.build_parser().parse_args(["--preset", preset, "--model", model, *flags])
    config = train_mac.resolve_config(args)
    return sum(p.numel() for p in train_mac.build_model(model, train_mac.preset_arch(config)).parameters())


def flags_for(model, flags):
    """A configuration's flags without those that do not apply to `model` (lmm has no segments,
    window no memory): `--flag value` or `--flag=value`."""
    unused = {f"--{key.replace('_', '-')}" for key in train_mac.UNUSED_ARCH_FLAGS.get(model, ())}
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag in unused:
            skip = True  # and its value
        elif flag.split("=", 1)[0] not in unused:
            kept.append(flag)
    return kept


def parse_config(text):
    """`--config NAME=FLAGS` -> (name, [flags])."""
    name, _, flags = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"must be NAME=FLAGS (FLAGS may be empty), got {text!r}")
    return name, shlex.split(flags)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1, help="threads per run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--config", dest="config_list", action="append", type=parse_config, default=[],
                        metavar="NAME=FLAGS", help="a configuration: train_mac.py flags (e.g. '--segment-len 128 "
                        "--chunk-size 16') every model is also run with; repeat for several (default: the preset as is)")
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
    args.configs = dict(args.config_list) or {"": []}
    if len(args.configs) != len(args.config_list or [None]):
        parser.error("--config: two configurations share a name")

    def directory(model, config, seed):
        return Path(args.out) / (f"{model}-{config}-seed{seed}" if config else f"{model}-seed{seed}").replace(" ", "_")

    # seed by seed: every model's and configuration's first seed comes first
    runs = [(model, config, seed) for seed in seeds for config in args.configs for model in models]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {key: pool.submit(run, *key, args, directory(*key)) for key in runs}
        results = {key: summary(future.result()) for key, future in futures.items()}

    rows = []
    for config, flags in args.configs.items():
        for model in models:
            done = [results[model, config, seed] for seed in seeds]
            bpb = [r["valid_bpb"] for r in done]
            params = parameters(model, args.preset, flags_for(model, flags))
            rows.append(([config] if config else []) + [
                model, f"{params / 1e6:.2f}M", f"{statistics.median(r['tokens_per_s'] for r in done):.0f}",
                f"{statistics.median(r['minutes'] for r in done):.2f}", f"{statistics.mean(bpb):.3f}",
                f"{min(bpb):.3f} - {max(bpb):.3f}", " ".join(f"{b:.3f}" for b in bpb)])
    print(f"\ndevice: {args.device} | {args.jobs} run(s) at a time, {args.threads} thread(s) each | preset "
          f"{args.preset}, {args.steps} steps ({done[0]['tokens']:,} tokens), seeds {args.seeds}"
          + (f" | more flags: {' '.join(args.extra)}" if args.extra else ""))
    print_table((["configuration"] if args.config_list else []) + [
        "model", "parameters", "training tokens/s (median)", "training minutes", f"validation bits/byte after "
        f"{args.steps} steps", "spread", "per seed"], rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: v for k, v in vars(args).items() if k != "config_list"},
               "runs": [{"model": m, "config": c, "seed": s, **results[m, c, s]} for m, c, s in runs]}
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    print(f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
