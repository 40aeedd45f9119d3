#!/usr/bin/env bash
# Everything GPU-related in one run, for a session with a lent GPU (see the README's Performance
# section): the CUDA tests, NeuralMemory timings (eager and captured as CUDA graphs) beside one
# SDPA layer and the two chunk loops (fused, dual form) by chunk size, the language models' training
# step and decoding (eager and from CUDA graphs), train_mac.py with and without CUDA graphs, and
# torchrun with nccl.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # from the project root; OUT_DIR defaults to $OUT or runs/gpu
#
# Each step has its own time limit (STEP_TIMEOUT seconds, default 240) and log; summary.txt
# collects each step's exit status and the end of its output. float32 with TF32 off throughout.
set -u
out=${1:-${OUT:-runs/gpu}}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
export NVIDIA_TF32_OVERRIDE=0

step() {
    local name=$1
    shift
    echo "== $name: $*" | tee -a "$summary"
    local start=$SECONDS
    timeout "${STEP_TIMEOUT:-240}" "$@" > "$out/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 30 "$out/$name.log" >> "$summary"
}

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee -a "$summary"
step cuda_tests python -m pytest -q -m cuda tests
step bench_memory python benchmarks/bench_memory.py --repeats 5 --skip-sweep --cuda-graphs
step bench_mac python benchmarks/bench_mac.py --model mac --repeats 3 --decode-contexts 256,4096
for model in mag mal lmm; do
    step "bench_$model" python benchmarks/bench_mac.py --model "$model" --repeats 2 --decode-contexts 256
done
# train_mac.py's base preset with its CUDA graphs (the default) and without: the log's tokens/s and capture time
common="--steps 6 --validate-every 0 --valid-batches 2 --sample-len 128 --checkpoint-every 0 --overwrite"
step train_graphs python train_mac.py $common --out "$out/train_graphs"
step train_eager python train_mac.py $common --no-cuda-graphs --out "$out/train_eager"
python - "$out" >> "$summary" <<'PY'
import json, sys
for run in ("train_graphs", "train_eager"):
    try:
        records = [json.loads(line) for line in open(f"{sys.argv[1]}/{run}/metrics.jsonl")]
        print(run, "tokens/s by step:", [round(r["tokens_per_s"]) for r in records if "tokens_per_s" in r])
    except OSError as error:
        print(run, "no metrics:", error)
PY
step torchrun_nccl torchrun --nproc_per_node=1 train_mac.py --preset test --device cuda --steps 6 --out "$out/ddp" --overwrite
echo "logs in $out" | tee -a "$summary"
