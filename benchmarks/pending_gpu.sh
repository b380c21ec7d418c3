#!/usr/bin/env bash
# The GPU measurements that benchmarks/RESULTS.md lists as unmeasured.
#
#   benchmarks/pending_gpu.sh STEP[,STEP...] [OUT] [BUDGET_S]
#
# Steps (seconds each took on an H100 in the 16th or 17th session, or an H200 in the 27th,
# wheel install excluded):
#   tests     CUDA tests: CUDA = CPU, guards, pipelines, CUDA-graph outputs, attention
#             kernels, nvJPEG decoding through torchvision and, where it imports, TorchCodec;
#             since the 31st session also the CLI commands on the GPU, binned evaluation's NaN
#             check, the resize's row split and real (not planted) out-of-memory errors
#             (104 in the 17th: 19 tests; 95 in the 27th: 24; the 31st's add ≈ 60 by estimate)
#   eval      evaluate end to end (512 1024-px PNGs with masks), fp32 baseline against the
#             optimised path and the optimised path with --device-resize (20th session), with
#             where the main thread's time went (part of e2e before the 17th session; 136 in
#             the 27th)
#   loader    evaluate's loader alone on the same kind of dataset at 16 workers: whole
#             batches per worker (to the 17th session) against chunks joined in the main
#             process (since), free and paced at a model's 190 ms per batch (≈ 60 s expected)
#   attention each attention kernel at Crane+'s shapes (attention.py: which kernel runs, ms,
#             TFLOP/s), then Crane+ with cuDNN attention first and with DINOv2 under fp16
#             autocast, beside the default and DINOv2-bf16 rows of the same run, against the
#             fp32 reference (variants.py --select ...) (60)
#   device-decode  predict from 2048-px JPEGs decoded on the GPU (nvJPEG; --device-decode)
#             against fast CPU decoding, same options as e2e-fast, at 16 and 4 workers; its
#             pixel, map and score differences from the reference decode; the decode-only
#             rate of each (128)
#   e2e       predict from JPEGs (default options), exact decode with the resize on the GPU
#             (--device-resize, 20th session: the workers only decode), one-file latency
#             (≈ 170: the 17th session's 253 s also ran evaluate and each row at 2
#             main-process threads; 137 in the 27th)
#   model     Crane+ and Crane model only, fp32 baseline against the optimised path, memory at
#             batch 1 (Crane+ alone: 48; 56 in the 27th)
#   variants  which options pay off: DINOv2 precisions, the one-SiLU MLP, cuDNN, the TF32
#             tail (81 without the two TF32-tail rows)
#   compiled  the same with torch.compile, 5 rows (88; 7 rows since)
#   e2e-fast  predict from 2048-px JPEGs with the fastest options measured, compiled, at 16,
#             12 and 8 workers, each with torch's and 2 main-process threads (160; 144 in the 27th)
#   floor     GEMM/attention time against the rest of a batch-32 bf16 predict (20)
#   outputs   how fast this machine's CPUs draw and write predict's overlays (23 s for 3
#             rows; 5 since: Pillow's and png_bytes's PNGs at 8 and 16 threads, JPEG)
#   rebatch   predict's loader alone over 1024 small JPEGs at 16 workers: the main process
#             joining chunks with torch.cat then pinning (to the 16th session) against
#             copying them straight into the pinned buffer (since), chunks of 2 and 8, at
#             torch's and 2 main-process threads (32)
#   train     the training target: Crane+ features of 1725 images encoded once in bf16, then
#             3 epochs over the cache (65; 60 in the 27th)
#   all       = tests,compiled,floor,device-decode,outputs,variants,model,e2e,eval,attention,
#             loader,rebatch,e2e-fast,train: what is still unmeasured on the current code first
#             (RESULTS.md, "Where the targets stand"): the CUDA tests, the compiled rows (the
#             TF32 tail's among them), the true-fp32 Gaussian's share of a batch, nvJPEG at
#             speed, the PNG writer on these CPUs, the eager variants not reached; then what
#             the 27th session measured on an H200 (model, e2e, eval, train, e2e-fast) and the
#             16th/17th on an H100
#
# OUT: folder for the JSON and log.txt (default benchmarks/results). BUDGET_S: wall-clock
# seconds for the whole script (0 = none); a step cut at the budget gets 20 s more to exit
# before it is killed, so stay that far below a hard limit (540 for a 600 s device call).
# A device machine is lent for minutes and goes back 30 s after a call, so one call should
# run several steps: each step runs under a timeout of the time left, a step whose useful
# minimum no longer fits is skipped, and the benchmarks write their JSON as rows finish, so
# a step cut short still returns what it measured. A step that fails does not stop the next.
# Exit status: 0 if every step ran and passed, else 1.
# Packages: crane from src/; open_clip (and anything else missing) from wheels in .whl/ if
# the interpreter lacks them (benchmarks/fetch_gpu_wheels.sh downloads them). Interpreter:
# $PYTHON, default python3.
set -uo pipefail
start=$SECONDS  # the budget counts from here, wheel installation included
steps=${1:?usage: pending_gpu.sh STEP[,STEP...]|all [OUT] [BUDGET_S]}
out=${2:-$(dirname "$0")/results}  # (a relative OUT: from the caller's directory)
budget=${3:-0}
py=${PYTHON:-python3}
[[ $steps == all ]] &&
  steps=tests,compiled,floor,device-decode,outputs,variants,model,e2e,eval,attention,loader,rebatch,e2e-fast,train
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
[[ $py == */* ]] && { py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" || exit 2; }
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$out/log.txt"

# Seconds a step needs to return anything useful (skipped below that; PENDING_GPU_LEAST_S
# sets one value for all, e.g. for a dry run with a stand-in interpreter).
# eval, train and outputs record their rows only once a whole run is done: their minimum is
# their full time (eval 136 s in the 27th session; train 60-65 s plus its fp32 baseline;
# outputs ~20 s of set-up per row).
declare -A least=([variants]=60 [compiled]=120 [tests]=45 [e2e-fast]=120 [floor]=90 [e2e]=120
                  [model]=90 [outputs]=45 [attention]=45 [device-decode]=120 [train]=90
                  [rebatch]=30 [eval]=150 [loader]=30)
if [[ -n ${PENDING_GPU_LEAST_S:-} ]]; then
  for step in "${!least[@]}"; do least[$step]=$PENDING_GPU_LEAST_S; done
fi
for step in ${steps//,/ }; do
  [[ -n ${least[$step]:-} ]] || { echo "unknown step $step" >&2; exit 2; }
done

if ! "$py" -c "import open_clip, timm" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    # (two versions of one package make pip refuse them all: say which, before paying more)
    dup=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1; done | sort | uniq -d)
    [[ -z $dup ]] || { echo "two wheels of $dup in .whl/: rerun fetch_gpu_wheels.sh" >&2; exit 3; }
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/crane-site .whl/*.whl || exit 3
    export PYTHONPATH="/tmp/crane-site:$PYTHONPATH"
  fi
  "$py" -c "import open_clip, timm" ||
    { echo "open_clip/timm missing: run benchmarks/fetch_gpu_wheels.sh here first" >&2; exit 3; }
fi

# TorchCodec, where its wheel came along and it imports with this torch (its builds are tied
# to torch releases): the CUDA tests then run the device decode through it too.
if compgen -G ".whl/optional/torchcodec-*.whl" >/dev/null &&
   ! "$py" -c "import torchcodec.decoders" 2>/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/crane-codec .whl/optional/torchcodec-*.whl &&
    PYTHONPATH="/tmp/crane-codec:$PYTHONPATH" "$py" -c "import torchcodec.decoders" 2>/dev/null &&
    export PYTHONPATH="/tmp/crane-codec:$PYTHONPATH" ||
    echo "torchcodec does not import with this torch: its CUDA decode tests are skipped"
fi

# shellcheck disable=SC2329  # run by name in a child bash (timeout needs a process)
run_step() {  # the command of one step
  case "$1" in
    tests) "$py" -m pytest -q -rs -p no:cacheprovider tests/test_fast_paths.py \
             tests/test_metrics_streaming.py tests/test_attention_kernels.py \
             tests/test_device_decode.py tests/test_pil_resample.py tests/test_cuda_paths.py \
             -k cuda ;;
    attention) "$py" benchmarks/attention.py --device cuda --batch 32 \
                 --json "$out/attention_b32.json"; rc=$?  # the second part runs either way
               "$py" benchmarks/variants.py --device cuda --batch 32 --select "bf16 default (cast" \
                 cuDNN "bf16, DINO fp16" "bf16, DINO bf16" --json "$out/variants_cudnn_b32.json" || rc=1
               return $rc ;;
    variants) "$py" benchmarks/variants.py --device cuda --batch 32 --json "$out/variants_b32.json" ;;
    compiled) "$py" benchmarks/variants.py --device cuda --batch 32 --compile \
                --select torch.compile --json "$out/variants_compiled_b32.json" ;;
    # The fastest end to end measured: fast decode, maps at model size, DINOv2 in bf16 and
    # torch.compile (the accuracy guard is in variants.py's row of the same options), at 16,
    # 12 and 8 workers, each with torch's and with 2 intra-op threads in the main process
    # (one compile); decode-only rows with PIL's and torch's shrink.
    e2e-fast) "$py" benchmarks/throughput.py --device cuda --presets crane+ --only e2e \
                --e2e fast-model --e2e-workers 16 12 8 --e2e-threads 0 2 --decode fast-pil fast \
                --files 1024 --no-e2e-baseline \
                --cfg dino_fp32=false --compile --json "$out/e2e_fast.json" ;;
    # JPEGs decoded by nvJPEG on the GPU (the workers only read files) against the fastest
    # CPU decoding, with e2e-fast's model options; 4 workers: whether a few cores now suffice.
    device-decode) "$py" benchmarks/throughput.py --device cuda --presets crane+ --only e2e \
                     --e2e device-model device-input fast-model --e2e-workers 16 4 \
                     --decode device fast --files 1024 --cfg dino_fp32=false --compile \
                     --no-e2e-baseline \
                     --json "$out/e2e_device.json" ;;
    # Default options (2 main-process threads measured in the 17th session: slower), and the
    # exact decode with the resize on the GPU (--device-resize); decode-only rows of each;
    # first the fp32 end-to-end baseline row (256 files) the speedups are measured against.
    e2e) "$py" benchmarks/throughput.py --device cuda --presets crane+ --only e2e latency \
           --e2e exact-input resize-input fast-input fast-model --decode exact resize fast \
           --files 1024 --json "$out/e2e.json" ;;
    eval) "$py" benchmarks/throughput.py --device cuda --presets crane+ --only eval \
            --eval-images 256 --json "$out/eval.json" ;;
    loader) "$py" benchmarks/dataset_loader.py --workers 16 --per-class 256 --px 1024 \
              --model-ms 0 190 --reps 1 --json "$out/dataset_loader.json" ;;
    # (Crane too: the issue asks for both presets; Crane+ first, the target's)
    model) "$py" benchmarks/throughput.py --device cuda --presets crane+ crane --only model \
             --json "$out/model.json" ;;
    outputs) "$py" benchmarks/outputs.py --files 64 --threads 8 16 --skip-baseline \
               --json "$out/outputs.json" ;;
    rebatch) "$py" benchmarks/rebatch.py --workers 16 --batch 32 --files 1024 --chunks 2 8 \
               --threads 0 2 --reps 1 --json "$out/rebatch.json" ;;
    train) "$py" benchmarks/throughput.py --device cuda --presets crane+ --only train \
             --json "$out/train.json" ;;
    floor) "$py" benchmarks/floor.py --device cuda --batch 32 --amp bf16 --reps 5 --verbose \
             --json "$out/floor_cuda_b32.json" ;;
  esac
}

summary=()
status=0
for step in ${steps//,/ }; do
  t0=$SECONDS
  limit=()
  if ((budget > 0)); then
    left=$((budget - (t0 - start)))
    if ((left <= 0 || left < least[$step])); then  # (timeout 0 would mean no limit)
      summary+=("$step: skipped (${left} s left, needs at least ${least[$step]} s)")
      status=1
      continue
    fi
    # SIGINT first: Python unwinds (pytest prints its summary), JSON written so far stays.
    limit=(timeout -s INT -k 20 "$left")
  fi
  echo "=== $step ($(date -u +%H:%M:%S))" | tee -a "$log"
  "${limit[@]}" bash -c "$(declare -f run_step); py=$(printf %q "$py") out=$(printf %q "$out");
    run_step $step" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  ((budget > 0 && (rc == 124 || rc == 137))) && note="cut at the budget" || note="exit $rc"
  ((rc == 0)) && note="ok" || status=1
  summary+=("$step: $note, $((SECONDS - t0)) s")
done
{
  echo "=== summary ($((SECONDS - start)) s in all)"
  printf '%s\n' "${summary[@]}"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
} | tee -a "$log"
exit $status
