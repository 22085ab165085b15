#!/usr/bin/env bash
# Runs on the lent GPU machine: installs the kit's wheels, builds the patched llama.cpp for CUDA
# (sm_90, no flash-attention kernels: ~4 min on 16 cores) and runs the GPU checks.
# MODE=asan-cpu builds an AddressSanitizer CPU library instead and runs the load under it.
set -euo pipefail
cd "$(dirname "$0")/.."
export FLASHMOE_CACHE=${FLASHMOE_CACHE:-/tmp/fmc}
mkdir -p "$FLASHMOE_CACHE/sdist"
cp -n .device-kit/sdist/*.tar.gz "$FLASHMOE_CACHE/sdist/" 2>/dev/null || true
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device-kit/wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "${MODE:-cuda}" in
  cuda)
    FLASHMOE_CUDA_ARCHITECTURES=90 FLASHMOE_CUDA_FA=0 python3 -m flashmoe build --backend cuda 2>&1 | tail -3
    python3 -m flashmoe build --info | tee "$OUT/build-info.txt"
    python3 scripts/gpu_check.py --tokens 64 2>&1 | grep -v "^/opt\|^python3\|^/lib\|^/usr" | tee "$OUT/gpu-check.txt"
    ;;
  cpu)
    python3 -m flashmoe build --backend cpu 2>&1 | tail -2
    python3 -m flashmoe build --info | head -6
    python3 scripts/gpu_check.py --cpu-only 2>&1 | tail -20 | tee "$OUT/cpu-check.txt" || true
    ;;&
  asan-cpu|cpu)
    python3 -m flashmoe.devpatch unpack /tmp/fmdev >/dev/null
    cmake -S /tmp/fmdev/vendor/llama.cpp -B /tmp/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_SHARED_LIBS=ON \
      -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
      -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON -DGGML_CUDA=OFF "-DCMAKE_C_FLAGS=-fsanitize=address -fno-omit-frame-pointer" \
      "-DCMAKE_CXX_FLAGS=-fsanitize=address -fno-omit-frame-pointer" -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address >/dev/null
    ninja -C /tmp/asan llama >/dev/null
    ASAN=$(${CC:-gcc} -print-file-name=libasan.so)
    LD_PRELOAD=$ASAN ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 LLAMA_CPP_LIB_PATH=/tmp/asan/bin \
      python3 scripts/gpu_check.py --cpu-only 2>&1 | tail -80 | tee "$OUT/asan.txt"
    ;;
esac
