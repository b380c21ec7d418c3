#!/usr/bin/env bash
# The GPU measurements that benchmarks/RESULTS.md lists as unmeasured, one step per call so
# that each fits a 10-minute device-tool command (≈ 3–8 min each on one H100):
#   benchmarks/pending_gpu.sh tests   OUT   # CUDA tests (CUDA = CPU, guards, pipelines)
#   benchmarks/pending_gpu.sh variants OUT  # which options pay off, incl. fp16 DINO attention
#   benchmarks/pending_gpu.sh compiled OUT  # the same with torch.compile (three compilations)
#   benchmarks/pending_gpu.sh e2e OUT       # predict from 2048-px JPEGs, latency, evaluate
#   benchmarks/pending_gpu.sh e2e-fast OUT  # the same from JPEGs with the fastest model options
#   benchmarks/pending_gpu.sh model OUT     # model-only fp32 baseline vs optimised, memory
#   benchmarks/pending_gpu.sh floor OUT     # GEMM/attention time vs the rest (≈ 2 min)
# OUT: folder for the JSON (default benchmarks/results).
set -euo pipefail
step=${1:?usage: pending_gpu.sh tests|variants|compiled|e2e|e2e-fast|model|floor [OUT]}
out=${2:-benchmarks/results}
mkdir -p "$out"
case "$step" in
  tests) python -m pytest -q -rs tests/test_fast_paths.py tests/test_metrics_streaming.py -k cuda ;;
  variants) python benchmarks/variants.py --device cuda --batch 32 --json "$out/variants_b32.json" ;;
  compiled) python benchmarks/variants.py --device cuda --batch 32 --compile --select torch.compile \
              --json "$out/variants_compiled_b32.json" ;;
  e2e) python benchmarks/throughput.py --device cuda --presets crane+ --only e2e latency eval \
         --files 1024 --eval-images 256 --json "$out/e2e_eval.json" ;;
  # Can end to end reach 150 img/s at all? Fast decode, maps at model size, DINOv2 attention
  # in fp16 and torch.compile (the accuracy guard is in variants.py's row of the same options).
  e2e-fast) python benchmarks/throughput.py --device cuda --presets crane+ --only e2e \
         --e2e fast-model --files 1024 --cfg dino_attn_fp16=true --compile \
         --json "$out/e2e_fast.json" ;;
  model) python benchmarks/throughput.py --device cuda --only model --json "$out/model.json" ;;
  floor) python benchmarks/floor.py --device cuda --batch 32 --amp bf16 --reps 5 --verbose \
           --json "$out/floor_cuda_b32.json" ;;
  *) echo "unknown step $step" >&2; exit 2 ;;
esac
