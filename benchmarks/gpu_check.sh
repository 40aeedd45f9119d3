#!/usr/bin/env bash
# Everything GPU-related in one run, for a session with a lent GPU (see the README's Performance
# section): the CUDA tests, NeuralMemory timings (eager and captured as CUDA graphs) beside one
# SDPA layer and the two chunk loops (fused, dual form) by chunk size, the language models' training
# step and decoding, and torchrun with nccl.
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
for model in mac mag mal lmm; do
    step "bench_$model" python benchmarks/bench_mac.py --model "$model" --repeats 3 --decode-contexts 256,4096
done
step torchrun_nccl torchrun --nproc_per_node=1 train_mac.py --preset test --device cuda --steps 6 --out "$out/ddp" --overwrite
echo "logs in $out" | tee -a "$summary"
