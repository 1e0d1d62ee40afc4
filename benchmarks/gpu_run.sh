#!/usr/bin/env bash
# One GPU session: build the CUDA kernels, run `pytest -m cuda`, and time the targets of issue 8.
# Output goes to $OUT (or ./gpu-out). Usage on the device machine: bash benchmarks/gpu_run.sh
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 MAMBA_KERNEL_CACHE=/tmp/mamba-kernels
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
[ -n "${VARIANTS-split=4;split=8}" ] && ( cd benchmarks && python3 scan_variants.py --build-only --variants "${VARIANTS:-split=4;split=8}" > "$OUT/scan-variants-build.txt" 2>&1 ) &  # compile meanwhile
( time python3 -m mamba_cli kernels build ) 2>&1 | tee "$OUT/build.txt"
python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"
python3 benchmarks/scan_microbench.py 2>&1 | tee "$OUT/scan.txt"
python3 benchmarks/gemm_microbench.py --rows 2,8,16 --splits 0 2>&1 | tee "$OUT/gemm.md"
wait
[ -n "${VARIANTS-split=4;split=8}" ] && ( cd benchmarks && python3 scan_variants.py --variants "${VARIANTS:-split=4;split=8}" ) 2>&1 | tee "$OUT/scan-variants.md"
C=benchmarks/configs
python3 benchmarks/profile_decode.py --config $C/mamba-130m-hf --batch 1,8,64 2>&1 | tee "$OUT/profile-decode.md"
python3 benchmarks/profile_decode.py --config $C/mamba-130m-hf --batch 8 --prompt 2048 2>&1 | tee "$OUT/profile-prefill.md"
for batch in 1 64; do python3 benchmarks/decode_timeline.py --config $C/mamba-130m-hf --batch $batch 2>&1 | tee "$OUT/timeline-b$batch.md"; done
python3 -m mamba_cli bench -m $C/mamba-130m-hf --dtype bfloat16 --backend torch,auto -p 2048 -g 128 -b 1 -r 3 2>&1 | tee "$OUT/bench-130m-b1.md"
python3 -m mamba_cli bench -m $C/mamba-130m-hf --dtype bfloat16 -p 2048 -g 128 -b 8,64 -r 3 2>&1 | tee "$OUT/bench-130m-b8-64.md"
python3 -m mamba_cli bench -m $C/mamba-130m-hf --dtype bfloat16 -p 0 -g 128 -b 2,16 -r 3 2>&1 | tee "$OUT/bench-130m-b2-16.md"
for size in 1.4b 2.8b; do
  python3 -m mamba_cli bench -m $C/mamba-$size-hf --dtype bfloat16 -p 2048 -g 128 -b 1,8,64 -r 3 2>&1 | tee "$OUT/bench-$size.md"
done
python3 -m mamba_cli eval-ppl -m tiny-wikitext --device cuda --dtype bfloat16 --kl-base tiny-wikitext --data tests/fixtures/wikitext-2-raw/wiki.test.raw --json --batch-size 8 2>&1 | tail -c 1500 | tee "$OUT/kl.json"
