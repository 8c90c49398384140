#!/usr/bin/env bash
# The GPU checks of a session, each step under a deadline, in two parts that fit one device
# call each (a lent machine gives a session ~15 minutes in all):
#   checks: the CUDA correctness checks, then the per-kernel profile of compiled decoding
#           (7B dims, 8 layers, batch 1 and 8) with the default attention (the Triton kernel at
#           one row, SDPA at more) and with CODELLAMA_TRITON_ATTENTION=1 (the kernel at every
#           batch size: make that the default if batch 8 is faster with it);
#   bench:  the full 7B bf16 benchmark with compile=True against Hugging Face (one
#           fresh-process rebuild), then, if time is left, ours with a 16K-position cache.
# Logs and JSON go to OUTDIR.
#
#     bash benchmarks/run_gpu.sh OUTDIR [checks|bench|all|measure|attention] [TOTAL_SECONDS]
#
# attention: bench_gpu_attention.py's variants of the attention kernel, then the full 7B's
#            batch-1 step profiled with the fastest of them.
# measure: all in one call, most important first: the 7B benchmark (no rebuilds), the CUDA
#          checks, then the full 7B's batch-1 step profiled kernel by kernel.
#
# The lent GPU machines have torch, Triton and transformers but not fairscale or fire: copy
# them (pure Python) into .gpu/site, which .git/info/exclude ignores, and carry .gpu:
#     mkdir -p .gpu/site && cp -r "$(python -c 'import fairscale,os;print(os.path.dirname(
#         os.path.dirname(fairscale.__file__)))')"/{fairscale,fire,termcolor} .gpu/site/
# On an H100 (2026-11-26): the checks took ~120 s before the two added in 3d (each compiles
# another model: allow ~200 s), a profile ~75 s, the 7B benchmark over 255 s with three
# rebuilds (one now).
set -u -o pipefail
out=${1:-gpu-out}
part=${2:-all}
total=${3:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CODELLAMA_CACHE=${CODELLAMA_CACHE:-/tmp/codellama-cache}
left() { echo $((total - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, fairscale, triton; print('torch', torch.__version__,
'transformers', transformers.__version__, 'fairscale', fairscale.__version__, 'triton',
triton.__version__)" | tee -a "$out/gpu.txt"

if [ "$part" = attention ]; then  # the attention kernel's variants, then the best in the model
    (cd benchmarks && timeout $(( $(left) < 200 ? $(left) / 2 : 170 )) python3 \
        bench_gpu_attention.py --budget_s 120 --out "$out/attention.json") 2>&1 |
        tee "$out/attention.log" | grep -E "^\||^best|Error"
    best=$(python3 -c "import json; print(json.load(open('$out/attention.json'))['best'])")
    [ "$(left)" -gt 60 ] && (cd benchmarks && timeout $(($(left) - 5)) python3 \
        profile_decode.py --n_layers 32 --batches 1 --attention "$best") 2>&1 |
        tee "$out/profile_7b_b1_best.log" | grep -E "^batch .* a step|^\| attend|^\| combine"
    echo "run_gpu.sh done in ${SECONDS} s"
    exit 0
fi

if [ "$part" = measure ]; then  # one call: the 7B figure first, then what time is left allows
    timeout $(( $(left) < 340 ? $(left) - 10 : 330 )) python3 benchmarks/bench_generate.py \
        --shape 7b --device cuda --dtype bfloat16 --compile True --runs 3 --build_runs 0 \
        --out "$out/7b_bf16_compile.json" 2>&1 | tee "$out/7b_bf16_compile.log" |
        grep -E "^\| (decode|fraction|prefill|mixed)"
    [ "$(left)" -gt 60 ] && timeout $(( $(left) < 230 ? $(left) - 5 : 225 )) python3 \
        benchmarks/cuda_check.py 2>&1 | tee "$out/cuda_check.log" | grep -E "PASS|FAIL|all"
    if [ "$(left)" -gt 100 ]; then  # the full 7B's step and its kernels (default attention)
        (cd benchmarks && timeout $(($(left) - 5)) python3 profile_decode.py --n_layers 32 \
            --batches 1) 2>&1 | tee "$out/profile_7b_b1.log" | grep -E "^batch .* a step|Warning"
    fi
    echo "run_gpu.sh done in ${SECONDS} s"
    exit 0
fi

if [ "$part" != bench ]; then
    timeout 220 python3 benchmarks/cuda_check.py 2>&1 | tee "$out/cuda_check.log" |
        grep -E "PASS|FAIL|all"
    (cd benchmarks && timeout 110 python3 profile_decode.py --n_layers 8 --batches 1,8) 2>&1 |
        tee "$out/profile.log" | grep -E "^batch .* a step"
    (cd benchmarks && CODELLAMA_TRITON_ATTENTION=1 timeout 110 python3 profile_decode.py \
        --n_layers 8 --batches 1,8) 2>&1 | tee "$out/profile_triton_attention.log" |
        grep -E "^batch .* a step|RuntimeWarning"
fi

if [ "$part" != checks ]; then
    timeout $(($(left) - 10)) python3 benchmarks/bench_generate.py --shape 7b --device cuda \
        --dtype bfloat16 --compile True --runs 3 --build_runs 1 \
        --out "$out/7b_bf16_compile.json" 2>&1 | tee "$out/7b_bf16_compile.log" |
        grep -E "^    |^\| (decode|fraction)"
    if [ "$(left)" -gt 150 ]; then  # a 16K-position cache must not slow compiled decoding
        timeout $(($(left) - 5)) python3 benchmarks/bench_generate.py --shape 7b \
            --device cuda --dtype bfloat16 --compile True --runs 3 --build_runs 0 \
            --peers none --max_seq_len 16384 --out "$out/7b_bf16_compile_16k.json" 2>&1 |
            tee "$out/7b_bf16_compile_16k.log" | grep -E "^\| (decode|fraction)"
    fi
fi
echo "run_gpu.sh done in ${SECONDS} s"
