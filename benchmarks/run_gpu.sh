#!/usr/bin/env bash
# Every GPU check of a session in one go, each step under a deadline: the CUDA correctness
# checks, the per-kernel profile of compiled decoding (7B dims, 8 layers, batch 1 and 8), the
# same with the opt-in Triton attention (CODELLAMA_TRITON_ATTENTION=1: turn it on by default
# if it is faster), then the full 7B bf16 benchmark with compile=True
# against Hugging Face (one fresh-process rebuild), then (ours only, if time is left) compiled
# with a 16K-position cache. Logs and JSON go to OUTDIR.
#
#     bash benchmarks/run_gpu.sh OUTDIR [TOTAL_SECONDS]
#
# The lent GPU machines have torch, Triton and transformers but not fairscale or fire: copy
# them (pure Python) into .gpu/site, which .git/info/exclude ignores, and carry .gpu:
#     mkdir -p .gpu/site && cp -r "$(python -c 'import fairscale,os;print(os.path.dirname(
#         os.path.dirname(fairscale.__file__)))')"/{fairscale,fire,termcolor} .gpu/site/
# On an H100 (2026-11-26) the checks took ~120 s, a profile ~75 s and the 7B benchmark over
# 255 s (with three rebuilds, which did not fit). bench_gpu_matmul.py (~25 s) is not run.
set -u -o pipefail
out=${1:-gpu-out}
total=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CODELLAMA_CACHE=${CODELLAMA_CACHE:-/tmp/codellama-cache}
left() { echo $((total - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, fairscale, triton; print('torch', torch.__version__,
'transformers', transformers.__version__, 'fairscale', fairscale.__version__, 'triton',
triton.__version__)" | tee -a "$out/gpu.txt"

timeout 130 python3 benchmarks/cuda_check.py 2>&1 | tee "$out/cuda_check.log" | grep -E "PASS|FAIL|all"
(cd benchmarks && timeout 100 python3 profile_decode.py --n_layers 8 --batches 1,8) 2>&1 |
    tee "$out/profile.log" | grep -E "^batch .* a step"
# The opt-in Triton attention for decoding, against the default (cuDNN's SDPA) just above
(cd benchmarks && CODELLAMA_TRITON_ATTENTION=1 timeout 100 python3 profile_decode.py \
    --n_layers 8 --batches 1,8) 2>&1 | tee "$out/profile_triton_attention.log" |
    grep -E "^batch .* a step|RuntimeWarning"

timeout $(($(left) - 10)) python3 benchmarks/bench_generate.py --shape 7b --device cuda \
    --dtype bfloat16 --compile True --runs 3 --build_runs 1 --out "$out/7b_bf16_compile.json" \
    2>&1 | tee "$out/7b_bf16_compile.log" | grep -E "^    |^\| (decode|fraction)"

if [ "$(left)" -gt 150 ]; then  # a 16K-position cache must not slow compiled decoding
    timeout $(($(left) - 5)) python3 benchmarks/bench_generate.py --shape 7b --device cuda \
        --dtype bfloat16 --compile True --runs 3 --build_runs 0 --peers none \
        --max_seq_len 16384 --out "$out/7b_bf16_compile_16k.json" 2>&1 |
        tee "$out/7b_bf16_compile_16k.log" | grep -E "^\| (decode|fraction)"
fi
echo "run_gpu.sh done in ${SECONDS} s"
