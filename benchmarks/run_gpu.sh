#!/usr/bin/env bash
# Every GPU check of a session in one go, each step under a deadline: the matrix-product
# kernels against cuBLAS, the CUDA correctness checks, then the 7B-shaped bf16 benchmark
# with compile=True (CUDA graphs) against Hugging Face, then (ours only, if time is left)
# compiled with a 16K-position cache, and eagerly. Logs and JSON go to OUTDIR.
#
#     bash benchmarks/run_gpu.sh OUTDIR [TOTAL_SECONDS]
set -u -o pipefail
out=${1:-gpu-out}
total=${2:-520}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CODELLAMA_CACHE=${CODELLAMA_CACHE:-/tmp/codellama-cache}
left() { echo $((total - SECONDS)); }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers, fairscale; print('torch', torch.__version__,
'transformers', transformers.__version__, 'fairscale', fairscale.__version__)" | tee -a "$out/gpu.txt"

timeout 100 python3 benchmarks/bench_gpu_matmul.py 2>&1 | tee "$out/matmul.log"
timeout 150 python3 benchmarks/cuda_check.py 2>&1 | tee "$out/cuda_check.log"

timeout $(($(left) - 10)) python3 benchmarks/bench_generate.py --shape 7b --device cuda \
    --dtype bfloat16 --compile True --runs 3 --build_runs 1 --out "$out/7b_bf16_compile.json" 2>&1 |
    tee "$out/7b_bf16_compile.log"

if [ "$(left)" -gt 120 ]; then  # a 16K-position cache must not slow compiled decoding
    timeout $(($(left) - 60)) python3 benchmarks/bench_generate.py --shape 7b --device cuda \
        --dtype bfloat16 --compile True --runs 3 --peers none --max_seq_len 16384 \
        --out "$out/7b_bf16_compile_16k.json" 2>&1 | tee "$out/7b_bf16_compile_16k.log"
fi
if [ "$(left)" -gt 80 ]; then
    timeout $(($(left) - 5)) python3 benchmarks/bench_generate.py --shape 7b --device cuda \
        --dtype bfloat16 --runs 3 --peers none --out "$out/7b_bf16_eager.json" 2>&1 |
        tee "$out/7b_bf16_eager.log"
fi
echo "run_gpu.sh done in ${SECONDS} s"
