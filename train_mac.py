"""Train a Titans language model (MAC by default) on enwik8 bytes, or on an offline corpus.

    python train_mac.py                                  # base preset (GPU-sized), enwik8 if present
    python train_mac.py --preset tiny --steps 300        # a few minutes on a 2-core CPU
    python train_mac.py --download                       # fetch enwik8 (Hutter prize zip) into data/ first
    python train_mac.py --data path/to/enwik8            # raw, .gz or the Hutter .zip
    python train_mac.py --model mag --preset tiny        # mac (default), mag, mal or lmm
    python train_mac.py --out runs/mac --resume          # continue a run from its last checkpoint
    python train_mac.py --out runs/mac --resume --eval-test   # ... and report test bits per byte at the end
    python train_mac.py --out runs/mac --generate "def "  # continue a prompt with the run's model (no training)
    torchrun --nproc_per_node=4 train_mac.py             # DistributedDataParallel (nccl on CUDA, gloo on CPU)

Data: enwik8 (data/enwik8.gz, data/enwik8.zip or data/enwik8, or --data PATH) with the standard
90M / 5M / 5M byte split (train / validation / test). When it is absent (and not downloaded), the
source of the Python standard library on this machine is split 90 / 5 / 5 % the same way, so the
script always runs. Validation (and, with --eval-test, test) is reported in bits per byte, a
uniform guess being 8.0, estimated on --valid-batches fixed windows of --seq-len bytes.

Output (--out): metrics.jsonl (one JSON record per step), checkpoint.pt (model, optimizer,
scheduler, step, RNG and data-stream states, config; written atomically, never after a
non-finite loss), model/ (the final model: config.json and model.safetensors, for
`from_pretrained`), curves.png (when matplotlib is installed: pip install -e ".[examples]").

Generation (--generate PROMPT): rebuilds the model from the checkpoint in --out (or from an
exported model directory given as --out) and prints the prompt's continuation byte by byte.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import ctypes
import functools
import gzip
import json
import math
import os
import random
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from tqdm import tqdm

from titans_pytorch import (
    MemoryAsContextTransformer,
    MemoryAsGateTransformer,
    MemoryAsLayerTransformer,
    MemoryTransformer,
    TitansTransformer,
)
from titans_pytorch.cuda_graphs import GraphedLoss, capture_cuda_graph
from titans_pytorch.pretrained import CONFIG_NAME, state_dict_mismatch, write_atomically

ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
DEFAULT_DATA = (Path("data/enwik8.gz"), Path("data/enwik8.zip"), Path("data/enwik8"))
OFFLINE_NAME = "offline corpus (Python standard library source)"
EVAL_SEED = 1234  # the same validation / test windows in every run
CHECKPOINT, METRICS, PLOT, EXPORT = "checkpoint.pt", "metrics.jsonl", "curves.png", "model"
GRAPH_CAPTURE = capture_cuda_graph  # the tests run the graphed training step on a CPU with its stand-in
GENERATE_DEFAULTS = dict(sample_len=256, temperature=0.8, min_p=0.1)

# ----------------------------------------------------------------------------- models and presets

MODEL_CLASSES = {
    "mac": MemoryAsContextTransformer,
    "mag": MemoryAsGateTransformer,
    "mal": MemoryAsLayerTransformer,
    "lmm": MemoryTransformer,
    "window": MemoryAsContextTransformer,  # the baseline: MAC with no memory layer (segment attention only)
}
_ATTENTION_ARGS = (
    "dim", "depth", "segment_len", "num_persist_mem_tokens", "heads", "dim_head", "ff_mult",
    "neural_memory_layers", "neural_memory_kwargs", "num_residual_streams",
)
MODEL_ARGS = {  # the constructor arguments each model takes from a preset's architecture
    "mac": _ATTENTION_ARGS + ("num_longterm_mem_tokens",),
    "mag": _ATTENTION_ARGS,
    "mal": _ATTENTION_ARGS,
    "lmm": ("dim", "depth", "ff_mult", "neural_memory_kwargs", "num_residual_streams"),
    "window": _ATTENTION_ARGS,
}


def _arch(dim, depth, segment_len, heads, dim_head, memory_layers, memory, ff_mult=4.0, streams=4, persist=4, longterm=4):
    return dict(
        dim=dim, depth=depth, segment_len=segment_len, heads=heads, dim_head=dim_head, ff_mult=ff_mult,
        num_persist_mem_tokens=persist, num_longterm_mem_tokens=longterm, neural_memory_layers=memory_layers,
        neural_memory_kwargs=memory, num_residual_streams=streams,
    )


PRESETS = {
    # a minuscule model for the tests: seconds on a CPU
    "test": dict(
        arch=_arch(16, 2, 8, 2, 8, (2,), dict(chunk_size=4, heads=1, dim_head=8), ff_mult=2.0, streams=1, persist=2, longterm=2),
        train=dict(steps=8, batch_size=2, seq_len=32, lr=3e-3, warmup=2, validate_every=4, valid_batches=2,
                   sample_every=0, sample_len=16, checkpoint_every=4, threads=1),
    ),
    # a CPU model: 300 steps take about 3.5 minutes on one core of our 2-core development machines
    "tiny": dict(
        arch=_arch(128, 4, 32, 4, 32, (2, 4), dict(chunk_size=8, heads=2, dim_head=32)),
        train=dict(steps=300, batch_size=16, seq_len=128, lr=3e-3, warmup=30, validate_every=100, valid_batches=16,
                   sample_every=0, sample_len=256, checkpoint_every=100, threads=1),
    ),
    # the GPU model (17.3M parameters as MAC; the size benchmarks/bench_mac.py measures)
    "base": dict(
        arch=_arch(384, 8, 32, 8, 64, (2, 4, 6), dict(chunk_size=4, heads=4, dim_head=64)),
        train=dict(steps=20_000, batch_size=16, seq_len=512, lr=1e-3, warmup=500, validate_every=500, valid_batches=32,
                   sample_every=2000, sample_len=512, checkpoint_every=1000, threads=0),
        # on a CPU, the same 16 x 512 bytes a step in micro-batches of 2 (a 512-byte sequence takes about
        # 1.7 GB in float32 for the backward pass, so 16 at once would need about 28 GB)
        cpu=dict(batch_size=2, grad_accum=8),
    ),
}
DEFAULTS = dict(preset="base", model="mac", grad_accum=1, weight_decay=0.1, clip=1.0, seed=0, device="auto", dtype="auto")


def build_model(name: str, preset) -> torch.nn.Module:
    """The `name` model ("mac", "mag", "mal", "lmm", or "window": MAC without memory layers, the
    baseline) with the architecture of `preset` (a preset name or an architecture dict)."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"model must be one of {sorted(MODEL_CLASSES)}, got {name!r}")
    arch = PRESETS[preset]["arch"] if isinstance(preset, str) else preset
    arguments = {key: arch[key] for key in MODEL_ARGS[name]}
    if name == "window":
        arguments["neural_memory_layers"] = ()
    return MODEL_CLASSES[name](num_tokens=256, **arguments)


# ----------------------------------------------------------------------------- command line


def _number(kind, low, inclusive, text):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low or (value == low and not inclusive):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what} {'>=' if inclusive else '>'} {low}, got {text!r}")
    return value


positive_int = functools.partial(_number, int, 0, False)
non_negative_int = functools.partial(_number, int, 0, True)
positive_float = functools.partial(_number, float, 0.0, False)
non_negative_float = functools.partial(_number, float, 0.0, True)


def layer_numbers(text):
    """`--memory-layers`: comma-separated layer numbers (1-indexed), or `none`."""
    if text.strip().lower() == "none":
        return ()
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        layers = ()
    if not layers or min(layers) < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer numbers from 1 (e.g. 2,4,6) or none, got {text!r}")
    return layers


UNUSED_ARCH_FLAGS = {"lmm": ("segment_len", "memory_layers"), "window": ("chunk_size", "memory_layers")}


def preset_arch(config) -> dict:
    """The preset's architecture with `--segment-len`, `--chunk-size` and `--memory-layers` applied."""
    unused = UNUSED_ARCH_FLAGS.get(config.model, ())
    given = [key for key in unused if getattr(config, key) is not None]
    if given:
        raise SystemExit(f"{flag_names(given, 'does', 'do')} not apply to --model {config.model}")
    arch = dict(PRESETS[config.preset]["arch"])
    if config.segment_len is not None:
        arch["segment_len"] = config.segment_len
    if config.chunk_size is not None:
        arch["neural_memory_kwargs"] = {**arch["neural_memory_kwargs"], "chunk_size": config.chunk_size}
    if config.memory_layers is not None:
        arch["neural_memory_layers"] = tuple(config.memory_layers)
    return arch


def describe_arch(arch: dict, model: str) -> str:
    """`segment 32, memory on layers [2, 4, 6], chunk 4`: what --segment-len, --memory-layers, --chunk-size set."""
    parts = [] if model == "lmm" else [f"segment {arch['segment_len']}"]
    if model == "window":
        return parts[0] + ", no memory"
    if model != "lmm":
        parts.append(f"memory on layers {list(arch['neural_memory_layers'])}")
    return ", ".join(parts + [f"chunk {arch['neural_memory_kwargs'].get('chunk_size', 16)}"])


def probability(text):
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def describe_presets() -> str:
    """The presets, for --help."""
    lines = ["presets (MAC sizes; --model mag / mal / lmm use the same dimensions):"]
    for name, preset in PRESETS.items():
        a, t = preset["arch"], preset["train"]
        memory = a["neural_memory_kwargs"]
        lines.append(
            f"  {name}: dim {a['dim']}, depth {a['depth']}, {a['heads']} heads of {a['dim_head']}, segment {a['segment_len']}, "
            f"memory on layers {list(a['neural_memory_layers'])} ({memory['heads']} heads of {memory['dim_head']}, chunk "
            f"{memory['chunk_size']}); {t['steps']:,} steps of {t['batch_size']} x {t['seq_len']} bytes, lr {t['lr']:g}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Flags default to None, meaning: the checkpoint's value when resuming, else the preset's,
    else DEFAULTS. So a resumed run needs no flags, and an explicit flag can be checked."""
    p = argparse.ArgumentParser(description=__doc__, epilog=describe_presets(), formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = "(default: the preset's)"
    p.add_argument("--preset", choices=sorted(PRESETS), help="model size and training defaults (default: base; tiny for a CPU)")
    p.add_argument("--model", choices=sorted(MODEL_CLASSES),
                   help="mac, mag, mal, lmm, or window: the baseline, MAC without memory layers (default: mac)")
    p.add_argument("--data", help="enwik8 file: raw, .gz or the Hutter .zip (default: data/enwik8.gz, .zip or raw)")
    p.add_argument("--download", action="store_true", help=f"fetch enwik8 from the Hutter prize site if absent ({ENWIK8_URL})")
    p.add_argument("--download-url", default=ENWIK8_URL, help="where --download fetches the zip from (default: the Hutter prize site)")
    p.add_argument("--segment-len", type=positive_int, help=f"attention segment (window) in bytes {preset}")
    p.add_argument("--chunk-size", type=positive_int, help=f"the memory's chunk: bytes that share a gradient point {preset}")
    p.add_argument("--memory-layers", type=layer_numbers,
                   help=f"layers with a neural memory, 1-indexed: 2,4,6 or none (lmm: every layer) {preset}")
    p.add_argument("--steps", type=positive_int, help=f"total optimizer steps {preset}")
    p.add_argument("--batch-size", type=positive_int, help=f"sequences per micro-batch and process {preset[:-1]}; base on a CPU: 2)")
    p.add_argument("--grad-accum", type=positive_int, help="micro-batches per optimizer step (default: 1; base on a CPU: 8)")
    p.add_argument("--seq-len", type=positive_int, help=f"bytes per training sequence {preset}")
    p.add_argument("--lr", type=positive_float, help=f"peak learning rate: linear warmup, cosine decay to 10%% {preset}")
    p.add_argument("--warmup", type=non_negative_int, help=f"warmup steps {preset}")
    p.add_argument("--weight-decay", type=non_negative_float, help="AdamW weight decay of matrices (default: 0.1)")
    p.add_argument("--clip", type=non_negative_float, help="gradient norm clipping, 0: off (default: 1.0)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=non_negative_int,
                   help="CPU threads, 0: all cores (default: 1 for test and tiny, whose small matrices gain little from "
                        "more and lose much when another process shares the cores; 0 for base)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"),
                   help="autocast dtype; the memory's inner loop stays float32 (default: bfloat16 on CUDA, else float32)")
    p.add_argument("--seed", type=non_negative_int, help="seed of the initialisation and the data streams (default: 0)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction,
                   help="replay each micro-batch's forward and backward (training) and each generated byte's step "
                        "(sampling) from CUDA graphs (default: on CUDA; for training, in a single process)")
    p.add_argument("--validate-every", type=non_negative_int, help=f"steps between validations, 0: only at the end {preset}")
    p.add_argument("--valid-batches", type=positive_int, help=f"batches per validation (fixed windows) {preset}")
    p.add_argument("--sample-every", type=non_negative_int, help=f"steps between samples, 0: only at the end {preset}")
    p.add_argument("--sample-len", type=non_negative_int, help=f"bytes per sample, 0: no samples {preset}")
    p.add_argument("--checkpoint-every", type=non_negative_int, help=f"steps between checkpoints, 0: only at the end {preset}")
    p.add_argument("--out", default="runs/mac", help="output directory (default: runs/mac)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a checkpoint")
    p.add_argument("--eval-test", action="store_true", help="report test bits per byte at the end")
    p.add_argument("--debug-nan-at", type=positive_int, help=argparse.SUPPRESS)  # tests: a non-finite loss at this step

    g = p.add_argument_group("generation", "--generate trains nothing: it loads the model in --out and continues PROMPT, "
                                           "printing each byte as it is drawn. --sample-len (default 256 here), --seed "
                                           "(default: a random seed), --device, --dtype, --threads and --cuda-graphs apply.")
    g.add_argument("--generate", metavar="PROMPT", help="continue PROMPT (text, as UTF-8 bytes) with the model of the run in "
                                                        "--out (its checkpoint.pt) or of an exported model directory")
    g.add_argument("--temperature", type=non_negative_float, help="sampling temperature, 0: greedy (default: 0.8)")
    choice = g.add_mutually_exclusive_group()
    choice.add_argument("--min-p", type=probability, help="keep the bytes at least this fraction as likely as the likeliest "
                                                          "(the default filter, at 0.1)")
    choice.add_argument("--top-k", type=positive_int, help="keep the K likeliest bytes")
    choice.add_argument("--top-p", type=probability, help="keep the likeliest bytes up to this total probability (nucleus)")
    return p


GENERATION_ONLY = ("generate", "temperature", "min_p", "top_k", "top_p")
GENERATION_SHARED = ("out", "sample_len", "seed", "device", "dtype", "threads", "cuda_graphs")


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Training and --generate take different flags: one given to the wrong one is an error."""
    given = [key for key, value in vars(args).items() if value != parser.get_default(key)]
    if args.generate is not None:
        stray = [key for key in given if key not in GENERATION_ONLY + GENERATION_SHARED]
        if stray:
            parser.error(f"--generate loads the model in --out and trains nothing: {flag_names(stray, 'does', 'do')} not apply")
        if not args.generate:
            parser.error("--generate: the prompt is empty")
    else:
        stray = [key for key in given if key in GENERATION_ONLY]
        if stray:
            parser.error(f"{flag_names(stray, 'applies', 'apply')} only with --generate")


def flag_names(keys, singular_verb: str, plural_verb: str) -> str:
    """`--a, --b do` from the namespace keys ["a", "b"]."""
    return ", ".join(f"--{key.replace('_', '-')}" for key in keys) + " " + (singular_verb if len(keys) == 1 else plural_verb)


# settings a resumed run takes from its checkpoint unless given, and those that must then match
CARRIED = ("preset", "model", "segment_len", "chunk_size", "memory_layers", "data", "steps", "batch_size", "grad_accum",
           "seq_len", "lr", "warmup", "weight_decay",
           "clip", "dtype", "seed", "validate_every", "valid_batches", "sample_every", "sample_len", "checkpoint_every")
MUST_MATCH = ("preset", "model", "segment_len", "chunk_size", "memory_layers", "batch_size", "grad_accum", "seq_len", "lr",
              "warmup", "weight_decay", "clip", "seed")


def resolve_config(args: argparse.Namespace, saved: dict | None = None, device_type: str = "cpu") -> SimpleNamespace:
    """Explicit flags, else the checkpoint's config (when resuming), else the preset (its CPU
    variant on a CPU), else DEFAULTS."""
    given = {key: value for key, value in vars(args).items() if value is not None}
    saved = saved or {}
    clashes = [f"--{key.replace('_', '-')} {given[key]} (the checkpoint has {saved[key]})"
               for key in MUST_MATCH if key in given and key in saved and given[key] != saved[key]]
    if clashes:
        raise SystemExit(f"--resume: {', '.join(clashes)}. Drop these flags to continue the run, or start a new one with another --out.")
    preset = given.get("preset") or saved.get("preset") or DEFAULTS["preset"]
    cpu = PRESETS[preset].get("cpu", {}) if device_type == "cpu" else {}
    defaults = {**DEFAULTS, **PRESETS[preset]["train"], **cpu, "preset": preset}
    config = {}
    for key in vars(args):
        if key in given:
            config[key] = given[key]
        elif key in CARRIED and key in saved:
            config[key] = saved[key]
        else:
            config[key] = defaults.get(key)
    return SimpleNamespace(**config)


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine")
        device = torch.device("cuda", local_rank if dist.is_initialized() else (device.index or 0))
        torch.cuda.set_device(device)  # what is made without a device (CUDA graphs' capture streams) goes there too
    return device


MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """On Linux with glibc, have malloc keep freed memory for reuse, as the environment variables
    `MALLOC_MMAP_THRESHOLD_` and `MALLOC_TRIM_THRESHOLD_` would at start-up: otherwise every freed
    block above 32 MiB (the fused chunk loop's state buffers, where it runs) and the heap's top go
    back to the kernel, and each step page-faults them in again (docs/performance.md).
    Left alone when either variable is set. Returns whether the setting was made."""
    if sys.platform != "linux" or any(name in os.environ for name in MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library exposing mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, (1 << 31) - 1))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------- data


def read_bytes(path: Path) -> bytes:
    """A file's bytes: raw, gzip (.gz) or the first member of a zip (.zip)."""
    if path.suffix == ".gz":
        with gzip.open(path) as f:
            return f.read()
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            return z.read(z.namelist()[0])
    return path.read_bytes()


def offline_corpus() -> bytes:
    """The Python standard library's top-level sources in sorted order: on every machine, no network."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join(path.read_bytes() for path in sorted(root.glob("*.py")))


def split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """enwik8's standard 90M / 5M / 5M split; any other data 90% / 5% / 5%, in file order."""
    if len(data) == ENWIK8_SIZE:
        a, b, _ = ENWIK8_SPLIT
    else:
        a, b = int(len(data) * 0.9), int(len(data) * 0.05)
    return data[:a], data[a : a + b], data[a + b :]


def download_enwik8(url: str, dest: Path, expected_size: int = ENWIK8_SIZE, show_progress: bool = True) -> Path:
    """Fetch the Hutter prize zip to `dest`, with a progress bar; keep it only if its one member
    is exactly `expected_size` bytes and intact. Written atomically: `dest` appears complete or
    not at all. Raises OSError (network) or ValueError (not enwik8)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="downloading enwik8", disable=not show_progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        try:
            with zipfile.ZipFile(part) as z:
                members = z.infolist()
                if len(members) != 1 or members[0].file_size != expected_size:
                    sizes = ", ".join(f"{m.filename}: {m.file_size:,} bytes" for m in members)
                    raise ValueError(f"not enwik8: expected one file of {expected_size:,} bytes, got {sizes or 'none'}")
                if z.testzip() is not None:
                    raise ValueError("the zip is corrupt (CRC mismatch)")
        except zipfile.BadZipFile as error:
            raise ValueError(f"not a zip file ({error})") from None
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def locate_data(config, log) -> Path | None:
    """The enwik8 file to read (found, or downloaded with --download), or None for the offline
    corpus (said in one line)."""
    candidates = (Path(config.data),) if config.data else DEFAULT_DATA
    found = next((path for path in candidates if path.exists()), None)
    if found is not None:
        return found
    if config.data and not config.download:
        raise SystemExit(f"--data {config.data}: no such file (add --download to fetch enwik8 there)")
    if not config.download:
        log(f"enwik8 not found at {candidates[0]} (--download fetches it): training on the {OFFLINE_NAME}")
        return None
    first = candidates[0]
    try:
        return download_enwik8(config.download_url, first if first.suffix == ".zip" else first.with_name("enwik8.zip"),
                               show_progress=log.enabled)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        log(f"could not download enwik8 from {config.download_url} ({reason}): training on the {OFFLINE_NAME}")
        return None


def load_data(config, log) -> tuple[str, bytes]:
    """(name, bytes) of the data every rank trains on: rank 0 locates (or downloads) it and tells
    the others, so that they never download or fall back on their own."""
    try:
        source = ("ok", locate_data(config, log)) if not dist.is_initialized() or dist.get_rank() == 0 else None
    except SystemExit as error:
        source = ("error", str(error))
    if dist.is_initialized():
        box = [source]
        dist.broadcast_object_list(box, src=0)
        source = box[0]
    if source[0] == "error":
        raise SystemExit(source[1])
    path = source[1]
    if path is None:
        return OFFLINE_NAME, offline_corpus()
    data = read_bytes(Path(path))
    return ("enwik8" if len(data) == ENWIK8_SIZE else Path(path).name), data


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """`(len(starts), seq_len + 1)` long tensor of the bytes at `starts` (inputs and next-byte targets)."""
    return data[starts[:, None] + torch.arange(seq_len + 1)].long()


class ByteStream:
    """Random training windows, drawn from its own generator so that the order can be saved and
    restored exactly (each distributed rank has its own seed, hence its own stream)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> torch.Tensor:
        starts = torch.randint(0, len(self.data) - self.seq_len, (self.batch_size,), generator=self.generator)
        return windows(self.data, starts, self.seq_len)


# ----------------------------------------------------------------------------- distributed


def use_cuda_graphs(wanted: bool | None, device: torch.device, world: int) -> bool:
    """Whether training replays its micro-batches from a CUDA graph: `--cuda-graphs` (True), `--no-cuda-graphs`
    (False) or, by default (None), on CUDA in a single process."""
    if wanted and device.type != "cuda":
        raise SystemExit(f"--cuda-graphs: needs a CUDA device, this run is on {device}")
    if wanted and world > 1:
        raise SystemExit("--cuda-graphs: not with several processes (DistributedDataParallel's gradient hooks run "
                         "on the host); drop the flag to train eagerly")
    return wanted if wanted is not None else device.type == "cuda" and world == 1


def setup_distributed(device_name: str | None):
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    probe = resolve_device(device_name)
    if probe.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if probe.type == "cuda" else "gloo")
    return dist.get_rank(), world, resolve_device(device_name, local_rank)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def rng_states(stream: ByteStream, device: torch.device) -> list[dict]:
    """Every rank's RNG states (data stream, torch, CUDA, Python), gathered for rank 0 to save."""
    state = {
        "data": stream.generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
    }
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_states(state: dict, stream: ByteStream, device: torch.device):
    stream.generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])


# ----------------------------------------------------------------------------- checkpoints and metrics


def save_atomically(obj, path: Path):
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`:
    a reader (or a crash) sees the old file or the new one, never a partial one."""
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


CHECKPOINT_KEYS = {"step", "tokens", "elapsed", "model", "optimizer", "scheduler", "rng", "config", "arch", "data", "world_size"}


def load_checkpoint(path: Path, flag: str = "--resume") -> dict:
    """The checkpoint at `path`, on the CPU; SystemExit with one line (starting with `flag`) if
    it is missing, unreadable or not a train_mac.py checkpoint."""
    if not path.exists():
        raise SystemExit(f"{flag}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise SystemExit(f"{flag}: cannot read {path} ({one_line(error)})") from None
    missing = CHECKPOINT_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else CHECKPOINT_KEYS
    if missing:
        raise SystemExit(f"{flag}: {path} is not a train_mac.py checkpoint (it lacks {', '.join(sorted(missing))})")
    return checkpoint


def one_line(error: Exception) -> str:
    """`Type: first sentence` of an error (torch's load errors go on to advice that does not fit)."""
    lines = str(error).splitlines()
    first = lines[0] if lines else ""
    return f"{type(error).__name__}: {first.split('. ')[0].removesuffix('.')}"


class Log:
    """Prints (rank 0 only) without breaking the progress bar."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str):
        if self.enabled:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()


class Metrics:
    """metrics.jsonl, one JSON record per line. A fresh run starts it empty; a resumed run drops
    the records after the checkpoint's step (written after it, before the run stopped)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if resume_step is not None else []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path, title: str = "") -> bool:
    """Train / validation bits per byte against step, as a PNG (written atomically). Returns
    False, writing nothing, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    records = read_metrics(metrics_path)
    train = [(r["step"], r["train_bpb"]) for r in records if "train_bpb" in r]
    valid = [(r["step"], r["valid_bpb"]) for r in records if "valid_bpb" in r]
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot(*zip(*train), label="train", alpha=0.6, linewidth=1)
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


# ----------------------------------------------------------------------------- training


class Diverged(Exception):
    """A non-finite loss, gradient, validation or parameter: the run stops without saving."""


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from 1 to 0.1 at `steps`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, config) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with weight decay on matrices only, and the warmup + cosine schedule."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    schedule = functools.partial(lr_factor, warmup=config.warmup, steps=config.steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train_step(model, optimizer, scheduler, stream, config, device, autocast, step, graphed=None) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches (each loss scaled by 1 / grad_accum),
    gradients averaged over ranks. Returns (mean loss over micro-batches and ranks, gradient
    norm); raises Diverged, without stepping, if either is not finite. `graphed` (a `GraphedLoss`
    of the model, single process): each micro-batch's forward and backward replayed from its graph."""
    total = torch.zeros((), device=device)
    keep_grads = graphed is not None  # the graph accumulates into the gradients it captured
    for micro in range(config.grad_accum):
        ids = stream.next().to(device, non_blocking=True)
        if graphed is not None:
            loss = graphed(ids)
            total += (loss * float("nan") if config.debug_nan_at == step else loss).float()
            continue
        last = micro == config.grad_accum - 1
        sync = model.no_sync() if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last else contextlib.nullcontext()
        with sync:
            with autocast():
                loss = model(ids, return_loss=True)
            if config.debug_nan_at == step:
                loss = loss * float("nan")
            (loss / config.grad_accum).backward()
        total += loss.detach().float()
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss = all_reduce_sum(total / config.grad_accum).item() / world
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip or float("inf")).item()
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=not keep_grads)
        raise Diverged(f"step {step}: the loss is {loss} (gradient norm {grad_norm})")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    return loss, grad_norm


@torch.no_grad()
def evaluate(model, data: torch.Tensor, config, device, autocast) -> float:
    """Bits per byte on `valid_batches` fixed windows, shared out among the ranks."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    starts = torch.randint(0, len(data) - config.seq_len, (config.valid_batches, config.batch_size), generator=generator)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total = torch.zeros((), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for index in range(rank, config.valid_batches, world):
        with autocast():
            total += model(windows(data, starts[index], config.seq_len).to(device), return_loss=True).double()
    model.train(was_training)
    return all_reduce_sum(total).item() / config.valid_batches / math.log(2)


_CONTROL = {code: "\N{REPLACEMENT CHARACTER}" for code in (*range(32), 127) if chr(code) not in "\n\t"}


def readable(ids: torch.Tensor) -> str:
    """Bytes as text: UTF-8 where valid, control characters (but newline and tab) as U+FFFD."""
    return bytes(ids.tolist()).decode("utf-8", errors="replace").translate(_CONTROL)


def sample_text(model, data: torch.Tensor, config, device, autocast, step: int, cuda_graphs: bool = True) -> str:
    """A continuation of a validation prompt by the cached sampler (min-p, temperature 0.8),
    under its own RNG so that sampling leaves the training run unchanged."""
    generator = torch.Generator().manual_seed(config.seed + step)
    prompt_len = min(64, config.seq_len)
    start = torch.randint(0, len(data) - prompt_len, (1,), generator=generator)
    prompt = data[start + torch.arange(prompt_len)].long()[None].to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + step)
        with autocast():
            sampled = model.sample(prompt, prompt_len + config.sample_len, temperature=0.8, cuda_graphs=cuda_graphs)
    rule = "-" * 30
    return (f"{rule} sample at step {step} {rule}\n{readable(prompt[0])}\n"
            f"{'>' * 10} the model continues:\n{readable(sampled[0])}\n{rule * 2}")


def due(step: int, every: int, final: int) -> bool:
    return step == final or (every > 0 and step % every == 0)


def params_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


class Trainer:
    """One training run (one process of it under torchrun): set up from the command line and,
    with --resume, the checkpoint; `fit()` trains to `config.steps` and returns the exit status."""

    def __init__(self, args: argparse.Namespace):
        self.rank, self.world, self.device = setup_distributed(args.device)
        self.main_process = self.rank == 0
        self.log = Log(self.main_process)
        self.out = Path(args.out)
        self.checkpoint_path = self.out / CHECKPOINT
        checkpoint = self._checkpoint_to_resume(args)
        self.config = config = resolve_config(args, checkpoint["config"] if checkpoint else None, self.device.type)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16,
                                          enabled=self.dtype == torch.bfloat16)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if config.threads:
            torch.set_num_threads(config.threads)
        if self.device.type == "cpu" and keep_freed_memory():
            self.log(f"cpu: glibc malloc keeps freed memory for reuse (set {' or '.join(MALLOC_VARIABLES)} to choose otherwise)")
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        if self.main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        self._setup_data(checkpoint)
        self._setup_model(checkpoint)
        self._announce(checkpoint)
        self.graphed = self._capture_training_step()
        self.sample_graphs = config.cuda_graphs is not False  # until a graphed sample fails
        self.metrics = Metrics(self.out / METRICS, self.main_process, self.step if checkpoint else None)
        self.good_step = self.step if checkpoint else None  # the step of the checkpoint on disk
        self.valid_bpb = None

    def _checkpoint_to_resume(self, args) -> dict | None:
        if args.resume:
            checkpoint = load_checkpoint(self.checkpoint_path)
            if checkpoint["world_size"] != self.world:
                raise SystemExit(f"--resume: the checkpoint was written by {checkpoint['world_size']} process(es), this run "
                                 f"has {self.world}; each process continues its own data stream, so use the same number")
            return checkpoint
        if self.checkpoint_path.exists() and not args.overwrite:
            raise SystemExit(f"{self.checkpoint_path} exists: add --resume to continue that run, --overwrite to start over, "
                             f"or use another --out")
        return None

    def _setup_data(self, checkpoint):
        config = self.config
        self.data_name, data = load_data(config, self.log)
        self.train_data, self.valid_data, self.test_data = (as_tensor(part) for part in split(data))
        sizes = [len(self.train_data), len(self.valid_data), len(self.test_data)]
        self.data_info = {"name": self.data_name, "sizes": sizes}
        if checkpoint and checkpoint["data"] != self.data_info:
            raise SystemExit(f"--resume: the checkpoint was trained on {checkpoint['data']}, this run has {self.data_info}")
        if min(sizes) <= config.seq_len:
            raise SystemExit(f"--seq-len {config.seq_len}: longer than a split of {self.data_name} ({sizes} bytes)")
        seed = config.seed + 1_000_003 * self.rank  # a data stream per rank
        self.stream = ByteStream(self.train_data, config.batch_size, config.seq_len, seed)

    def _setup_model(self, checkpoint):
        config = self.config
        self.arch = checkpoint["arch"] if checkpoint else preset_arch(config)
        try:
            self.raw_model = build_model(config.model, self.arch).to(self.device)
        except ValueError as error:  # e.g. a segment that is not a multiple of the chunk
            raise SystemExit(f"--segment-len / --chunk-size / --memory-layers: {error}") from None
        self.optimizer, self.scheduler = make_optimizer(self.raw_model, config)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        if checkpoint:
            self.raw_model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.scheduler.load_state_dict(checkpoint["scheduler"])
            restore_rng_states(checkpoint["rng"][self.rank], self.stream, self.device)
            self.step, self.tokens, self.elapsed = checkpoint["step"], checkpoint["tokens"], checkpoint["elapsed"]
        self.model = self.raw_model
        if self.world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.raw_model, device_ids=device_ids)
        self.tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * self.world

    def _announce(self, checkpoint):
        config, sizes = self.config, self.data_info["sizes"]
        params = sum(p.numel() for p in self.raw_model.parameters())
        self.log(f"data: {self.data_name}, {sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} bytes (train / validation / test) | "
                 f"model: {config.model} {config.preset} ({describe_arch(self.arch, config.model)}), "
                 f"{params / 1e6:.2f}M parameters | {self.device} "
                 f"{str(self.dtype).removeprefix('torch.')}, {self.world} process(es) | {config.batch_size} x "
                 f"{config.seq_len} bytes x {config.grad_accum} accumulated x {self.world} = {self.tokens_per_step:,} per step")
        if config.preset == "base" and self.device.type == "cpu":
            self.log("note: the base preset is sized for a GPU (on a CPU: micro-batches of 2 sequences, about 6 GB of "
                     "memory and a minute or more a step); --preset tiny trains in minutes")
        if checkpoint:
            self.log(f"resuming {self.checkpoint_path} at step {self.step} of {config.steps}")

    def _capture_training_step(self) -> GraphedLoss | None:
        """The micro-batch's forward and backward as a CUDA graph (`--cuda-graphs`, default on CUDA in a
        single process), captured on zero ids (no data drawn, nothing learned), or None."""
        config = self.config
        if not use_cuda_graphs(config.cuda_graphs, self.device, self.world):
            return None
        ids = torch.zeros(config.batch_size, config.seq_len + 1, dtype=torch.long, device=self.device)
        with self.autocast():
            graphed = GraphedLoss(self.raw_model, ids, scale=1 / config.grad_accum, capture=GRAPH_CAPTURE)
        self.log(f"cuda graphs: a micro-batch's forward and backward captured in {graphed.capture_seconds:.1f} s "
                 f"(--no-cuda-graphs: eager)")
        return graphed

    # ------------------------------------------------------------------ the run

    def fit(self) -> int:
        config = self.config
        progress = tqdm(total=config.steps, initial=self.step, desc="training", dynamic_ncols=True, disable=not self.main_process)
        try:
            while self.step < config.steps:
                record = self._train_one_step()
                progress.update(1)
                progress.set_postfix(loss=f"{record['train_loss']:.3f}", bpb=f"{record['train_bpb']:.3f}",
                                     valid=f"{self.valid_bpb:.3f}" if self.valid_bpb is not None else "-",
                                     tok_s=f"{record['tokens_per_s']:,.0f}")
                if due(self.step, config.checkpoint_every, config.steps):
                    self._save()
                if config.sample_len and config.sample_every and self.step % config.sample_every == 0 and self.step < config.steps:
                    self._print_sample()
        except Diverged as error:
            progress.close()
            if self.good_step is None:
                self.log(f"{error}; stopping. No checkpoint was written.")
            else:
                self.log(f"{error}; stopping. The last good checkpoint, step {self.good_step}, is kept at "
                         f"{self.checkpoint_path} (--resume continues it; a lower --lr may help).")
            return 1
        progress.close()
        self._finish()
        return 0

    def _train_one_step(self) -> dict:
        """One optimizer step, its metrics record (with validation when due), written."""
        started = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # this step's
        loss, grad_norm = train_step(self.model, self.optimizer, self.scheduler, self.stream, self.config, self.device,
                                     self.autocast, self.step + 1, graphed=self.graphed)
        seconds = time.perf_counter() - started
        self.step += 1
        self.elapsed += seconds
        self.tokens += self.tokens_per_step
        record = {"step": self.step, "train_loss": loss, "train_bpb": loss / math.log(2),
                  "lr": lr, "grad_norm": grad_norm, "tokens": self.tokens,
                  "tokens_per_s": self.tokens_per_step / seconds}
        if due(self.step, self.config.validate_every, self.config.steps):
            self.valid_bpb = record["valid_bpb"] = self._evaluate(self.valid_data)
            if not math.isfinite(self.valid_bpb):
                raise Diverged(f"step {self.step}: the validation bits per byte are {self.valid_bpb}")
        self.metrics.write(record)
        return record

    def _evaluate(self, data: torch.Tensor) -> float:
        return evaluate(self.raw_model, data, self.config, self.device, self.autocast)

    def _save(self):
        """The checkpoint, atomically, by rank 0 (every rank sends its RNG states); never from
        non-finite parameters."""
        states = rng_states(self.stream, self.device)  # a collective: every rank takes part
        if not params_finite(self.raw_model):
            raise Diverged(f"step {self.step}: the parameters are not finite")
        if self.main_process:
            save_atomically(
                {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed, "model": self.raw_model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": states,
                 "config": vars(self.config), "arch": self.arch, "data": self.data_info, "world_size": self.world},
                self.checkpoint_path,
            )
        self.good_step = self.step

    def _print_sample(self):
        if not self.main_process:
            return
        def sample():
            return sample_text(self.raw_model, self.valid_data, self.config, self.device, self.autocast, self.step,
                               self.sample_graphs)

        try:
            self.log(sample())
        except (RuntimeError, ValueError) as error:  # CUDA's errors, or the decoder's own checks (copy_plan's):
            # a sample is not worth the run: retry eagerly, and stay eager
            if not self.sample_graphs:
                raise
            self.log(f"sampling from CUDA graphs failed ({one_line(error)}); sampling eagerly from now on")
            self.sample_graphs = False
            self.log(sample())

    def _finish(self):
        """The final sample, test bits per byte (--eval-test), the export (OUT/model), the plot
        and the summary line."""
        config = self.config
        if config.sample_len:
            self._print_sample()
        test_bpb = None
        if config.eval_test:
            test_bpb = self._evaluate(self.test_data)
            self.metrics.write({"step": self.step, "test_bpb": test_bpb})
        if not self.main_process:
            return
        self.raw_model.save_pretrained(self.out / EXPORT)  # config.json last: an interrupted export does not load
        metrics_path = self.out / METRICS
        plotted = plot_curves(metrics_path, self.out / PLOT, f"{config.model} {config.preset} on {self.data_name}")
        valid_bpb = self.valid_bpb
        if valid_bpb is None:  # resumed at the end: report the last validation
            valid_bpb = next((r["valid_bpb"] for r in reversed(read_metrics(metrics_path)) if "valid_bpb" in r), math.nan)
        files = [METRICS, CHECKPOINT, f"{EXPORT}/"] + ([PLOT] if plotted else [])
        self.log(f"done: step {self.step}, validation {valid_bpb:.3f} bits per byte"
                 + (f", test {test_bpb:.3f}" if test_bpb is not None else "")
                 + f" | {self.elapsed / 60:.1f} min training | {', '.join(files)} in {self.out}"
                 + ("" if plotted else f" (no {PLOT}: matplotlib is not installed; pip install -e '.[examples]')"))


# ----------------------------------------------------------------------------- generation


def load_trained_model(out: Path) -> tuple[torch.nn.Module, dict]:
    """The model of the run in `out`, rebuilt from its checkpoint (the saved model name and
    architecture), and the run's config; or, for an exported model directory (config.json and
    no checkpoint), `from_pretrained` and {}. SystemExit with one line if it cannot be loaded."""
    if (out / CONFIG_NAME).exists() and not (out / CHECKPOINT).exists():
        try:
            return TitansTransformer.from_pretrained(out), {}
        except (OSError, ValueError) as error:
            raise SystemExit(f"--generate: {one_line(error)}") from None
    path = out / CHECKPOINT
    checkpoint = load_checkpoint(path, "--generate")
    try:
        name = checkpoint["config"]["model"]
        model = build_model(name, checkpoint["arch"])
        mismatch = state_dict_mismatch(model.state_dict(), checkpoint["model"])
        if mismatch:
            raise ValueError(f"its weights do not fit its {name} model: {mismatch}")
        model.load_state_dict(checkpoint["model"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as error:
        raise SystemExit(f"--generate: cannot rebuild the model of {path} ({one_line(error)})") from None
    return model.eval(), checkpoint["config"]


class TextStream:
    """Writes bytes to a text stream as soon as they complete a character: UTF-8 decoded
    incrementally, invalid bytes and control characters (but newline and tab) as U+FFFD,
    flushed at every write."""

    def __init__(self, file):
        self.file = file
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data: bytes, final: bool = False):
        self.file.write(self.decoder.decode(data, final=final).translate(_CONTROL))
        self.file.flush()


def generate_text(args: argparse.Namespace) -> int:
    """--generate: print the prompt, then its continuation by the model in --out, byte by byte."""
    model, run_config = load_trained_model(Path(args.out))
    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else run_config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    dtype = resolve_dtype(args.dtype or "auto", device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    else:
        torch.seed()
    if args.top_k is not None:
        filter_fn, filter_kwargs = "top_k", {"k": args.top_k}
    elif args.top_p is not None:
        filter_fn, filter_kwargs = "top_p", {"thres": args.top_p}
    else:
        filter_fn, filter_kwargs = "min_p", {"min_p": args.min_p or GENERATE_DEFAULTS["min_p"]}
    temperature = args.temperature if args.temperature is not None else GENERATE_DEFAULTS["temperature"]
    length = args.sample_len if args.sample_len is not None else GENERATE_DEFAULTS["sample_len"]

    prompt = args.generate.encode("utf-8", "surrogateescape")  # bytes the shell passed, valid UTF-8 or not
    ids = torch.tensor(list(prompt), device=device)[None]
    text = TextStream(sys.stdout)
    text.write(prompt)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        for token in model.to(device).generate(ids, length, temperature, filter_fn, filter_kwargs,
                                               cuda_graphs=args.cuda_graphs is not False):
            text.write(bytes(token[0].tolist()))
    text.write(b"\n", final=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.generate is not None:
        return generate_text(args)
    try:
        return Trainer(args).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
