#!/usr/bin/env bash
# Steering and evaluation speed on one GPU (issue 28's GPU targets), in one device run of under 10 minutes.
#
#   bash benchmarks/gpu_speed.sh            # logs to $OUT if set (the device runner's folder), else benchmarks/results
#
# On a LLaVA-7B-shaped language model (hidden 4096, 32 layers, all steered; random weights built on the GPU in
# seconds), bf16:
#   1. steering_overhead, batch 1, eager (hooks): target dataset-level <= 1%                       (~2 min)
#   2. steering_overhead, batch 8, eager + static cache with a compiled decode step (fullgraph,
#      CUDA graphs): targets dataset-level <= 1% eager and <= 1% over plain compiled generation     (~4 min)
#   3. evaluate_throughput, 32 items, batch 8: target evaluate >= 0.95x plain batched generation    (~2 min)
# Each step has its own time limit, so one that overruns costs only itself; each log ends with its target lines.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
py="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
common=(--device cuda --dtype bfloat16 --shape 7b)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$out/gpu_speed_device.txt"
timeout 150 "$py" benchmarks/steering_overhead.py "${common[@]}" --batch 1 --repeats 9 --decode-rounds 40 --no-compiled --no-shiftdc \
    2>&1 | tee "$out/steering_overhead_gpu_b1.log"
timeout 270 "$py" benchmarks/steering_overhead.py "${common[@]}" --batch 8 --repeats 9 --decode-rounds 40 --no-shiftdc \
    2>&1 | tee "$out/steering_overhead_gpu_b8.log"
timeout 140 "$py" benchmarks/evaluate_throughput.py "${common[@]}" --items 32 --batch 8 --new-tokens 32 --repeats 3 \
    2>&1 | tee "$out/evaluate_throughput_gpu.log"
grep -h "(target" "$out"/steering_overhead_gpu_b*.log "$out/evaluate_throughput_gpu.log"
