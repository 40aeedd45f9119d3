#!/usr/bin/env bash
# Everything GPU-related, for a session with a lent GPU (see the README's Performance section): the
# CUDA tests, NeuralMemory timings (eager and captured as CUDA graphs) beside one SDPA layer and the
# two chunk loops (fused, dual form) by chunk size, the language models' training step and decoding
# (eager and from CUDA graphs), train_mac.py with and without CUDA graphs, torchrun with nccl, and a
# sweep of base-preset configurations (segment and chunk sizes) for the GPU preset.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the project root; OUT_DIR defaults to $OUT or runs/gpu
#
# GPU_CHECK_PARTS picks the parts (default: all, in this order): tests memory models train ddp presets.
# A device command may run 10 minutes at most and a session has about 15 minutes of device time, its
# start-up (minutes) included, so most sessions get one long call: the most important parts first
# (our estimates, never measured: tests 3-5 min with the warp scan's and the norm kernels' compiles, memory 2-3, models 5-6,
# train 2, ddp 1, presets 5), e.g.
#   GPU_CHECK_PARTS="tests train" bash benchmarks/gpu_check.sh     # do the graphs work, what do they gain
#   GPU_CHECK_PARTS="models ddp" bash benchmarks/gpu_check.sh
#   GPU_CHECK_PARTS="memory presets" bash benchmarks/gpu_check.sh
# Each step has its own time limit (STEP_TIMEOUT seconds, default 240; the CUDA tests TESTS_TIMEOUT,
# default 360; bench_memory.py MEMORY_TIMEOUT, default 300; the sweep PRESETS_TIMEOUT, default 420) and log; summary.txt collects each step's exit
# status and the end of its output.
# float32 with TF32 off, except train_mac.py (its defaults: bf16 autocast, TF32 on).
set -u
out=${1:-${OUT:-runs/gpu}}
parts=${GPU_CHECK_PARTS:-"tests memory models train ddp presets"}
mkdir -p "$out"
summary="$out/summary.txt"
touch "$summary"
export NVIDIA_TF32_OVERRIDE=0

step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$summary"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 30 "$out/$name.log" >> "$summary"
}
wants() { [[ " $parts " == *" $1 "* ]]; }
limit=${STEP_TIMEOUT:-240}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$summary"
if wants tests; then
    step cuda_tests "${TESTS_TIMEOUT:-360}" python -m pytest -q -m cuda tests --durations=15
fi
if wants memory; then
    step bench_memory "${MEMORY_TIMEOUT:-300}" python benchmarks/bench_memory.py --repeats 5 --skip-sweep --cuda-graphs
fi
if wants models; then
    step bench_mac "$limit" python benchmarks/bench_mac.py --model mac --repeats 3 --decode-contexts 256,4096
    # decoding with the paper's segments of 512 over chunks of 16 (17 graphs on static attention caches)
    step bench_mac_paper_decoding "$limit" python benchmarks/bench_mac.py --model mac --skip-train --repeats 3 \
        --segment-len 512 --chunk-size 16 --decode-contexts 256,4096
    for model in mag mal lmm; do
        step "bench_$model" "$limit" python benchmarks/bench_mac.py --model "$model" --repeats 2 --decode-contexts 256
    done
    # the fused hyper-connections against the library's forward (one connection, a decoding step)
    step bench_hyper_connections "$limit" python benchmarks/bench_mac.py --hyper-connections
fi
if wants train; then
    # train_mac.py's base preset with its CUDA graphs (the default) and without: tokens/s and the capture time
    common="--steps 6 --validate-every 0 --valid-batches 2 --sample-len 128 --checkpoint-every 0 --overwrite"
    step train_graphs "$limit" python train_mac.py $common --out "$out/train_graphs"
    step train_eager "$limit" python train_mac.py $common --no-cuda-graphs --out "$out/train_eager"
    python - "$out" >> "$summary" <<'PY'
import json, sys
for run in ("train_graphs", "train_eager"):
    try:
        records = [json.loads(line) for line in open(f"{sys.argv[1]}/{run}/metrics.jsonl")]
        print(run, "tokens/s by step:", [round(r["tokens_per_s"]) for r in records if "tokens_per_s" in r])
    except OSError as error:
        print(run, "no metrics:", error)
PY
fi
if wants ddp; then
    step torchrun_nccl "$limit" torchrun --nproc_per_node=1 train_mac.py --preset test --device cuda --steps 6 \
        --out "$out/ddp" --overwrite
fi
if wants presets; then
    # the same bytes per step (16 x 512; the paper's segment of 512 with 4 x 2048) and steps for each
    step presets "${PRESETS_TIMEOUT:-420}" python benchmarks/compare_variants.py --device cuda --threads 4 \
        --preset base --models mac --seeds 0 --steps 150 --out "$out/presets" \
        --config "segment 32, chunk 4 (base)=" \
        --config "segment 64, chunk 8=--segment-len 64 --chunk-size 8" \
        --config "segment 128, chunk 16=--segment-len 128 --chunk-size 16" \
        --config "segment 512, chunk 16, 4 x 2048=--segment-len 512 --chunk-size 16 --batch-size 4 --seq-len 2048" \
        -- --warmup 30 --validate-every 0 --valid-batches 8 --sample-len 0 --checkpoint-every 0
fi
echo "logs in $out" | tee -a "$summary"
