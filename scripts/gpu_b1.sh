#!/usr/bin/env bash
# B1 on the lent GPU machine (issue 13): the patched CUDA build (scripts/device_run.sh's build step, no RPC),
# the B1 model and a uniform routing trace written there, then `flashmoe bench` of
#   gpu-b1          dense weights on the GPU, routed experts streamed from disk into a VRAM cache
#                   (policy configs/gpu-dense.yaml with GPU_B1_SLOTS slots per layer: well under half the model)
#   stock-n-cpu-moe llama.cpp's `-ot exps=CPU`: experts in host RAM on the mmap, the rest on the GPU
#   all-gpu         every weight on the GPU (it fits an H200)
#   stock-mmap      llama.cpp on the CPU (no GPU placement), weights on the mmap
# all under the same trace, unconfined (the machine has 128 GiB), 64-token prompt, 128 generated tokens.
#   run('bash scripts/gpu_b1.sh', carry=['.device-kit'])     (STAGE=build|bench to split it over two calls;
#   STAGE=check GPU_CHECK=1: the build and the tiny-model GPU check only)
# GPU_B1_BUDGET=4GiB: gpu-b1 keeps `cache_size: auto` and sizes its VRAM cache from `gpu_budget` instead of
# GPU_B1_SLOTS; GPU_B1_VS: the stock references (default "stock-n-cpu-moe stock-mmap"); GPU_B1_ALLGPU=0
# leaves out all-gpu. nvidia-smi samples the device memory in use during the bench ($OUT/vram.csv).
# GPU_B1_KIND=realistic: that trace instead of the uniform one (the file keeps its name).
# GPU_B1_POLICIES: shipped configs to run (default gpu-dense; gpu-ram: experts from page-locked RAM with
# reads ahead; NAME-noahead: the same without reads ahead; NAME@SIZE: with gpu_budget SIZE); GPU_B1_ACC=0.75: the trace carries predicted
# sets drawn at that accuracy (reads ahead use them); GPU_CHECK=1: scripts/gpu_check.py on the tiny models
# first. GPU runs are compared with a stock run with every tensor on the GPU at their ubatch (the bench's
# GPU reference). WHEEL_OUT=$OUT/wheel: the built wheel comes back in parts (scripts/device_wheel.sh); put
# them in .device-kit/cuda-wheel/ and later cold calls install it instead of compiling (same patch only).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLASHMOE_CACHE=${FLASHMOE_CACHE:-/tmp/fmc}
OUT=${OUT:-/tmp/out}
mkdir -p "$FLASHMOE_CACHE/sdist" "$OUT"
export PYTHONPATH=/tmp/site:$PWD
STAGE=${STAGE:-all}
SLOTS=${GPU_B1_SLOTS:-40}
READERS=${GPU_B1_READERS:-4}
t0=$(date +%s)
log() { echo "[gpu-b1 $(( $(date +%s) - t0 ))s] $*"; }
if [[ $STAGE == all || $STAGE == build || $STAGE == check ]]; then
  cp -n .device-kit/sdist/*.tar.gz "$FLASHMOE_CACHE/sdist/" 2>/dev/null || true
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .device-kit/wheels/*.whl
  # a wheel carried from an earlier call (scripts/device_wheel.sh) is installed if its build key matches
  [[ -d .device-kit/cuda-wheel ]] && bash scripts/device_wheel.sh import .device-kit/cuda-wheel
  FLASHMOE_CUDA_ARCHITECTURES=90 FLASHMOE_CUDA_FA=0 python3 -m flashmoe build --backend cuda --no-rpc 2>&1 | tail -2
  [[ -n ${WHEEL_OUT:-} ]] && bash scripts/device_wheel.sh export "$WHEEL_OUT"
  python3 -m flashmoe build --info > "$OUT/build-info.txt" || true
  log "built"
  if [[ ${GPU_CHECK:-0} == 1 ]]; then
    python3 scripts/gpu_check.py --tokens 48 2>&1 | grep -v "^/opt\|^python3\|^/lib\|^/usr" | tee "$OUT/gpu-check.txt" || true
    log "gpu check done"
  fi
  [[ $STAGE == check ]] && exit 0
  [[ -f /tmp/b1.gguf ]] || python3 -m flashmoe synth --arch qwen3moe --preset bench --seed 0 -o /tmp/b1.gguf | tail -1
  python3 -m flashmoe trace gen -m /tmp/b1.gguf --kind "${GPU_B1_KIND:-uniform}" --tokens 512 --seed 0 \
      ${GPU_B1_ACC:+--predict-accuracy $GPU_B1_ACC} -o /tmp/b1-uniform.trace
  log "model and trace written"
fi
if [[ $STAGE == all || $STAGE == bench ]]; then
  POLS=()
  for QB in ${GPU_B1_POLICIES:-gpu-dense}; do
    Q=${QB%@*}; B=${GPU_B1_BUDGET:-}; [[ $QB == *@* ]] && B=${QB#*@}
    P=${Q%-noahead}
    N=${Q/gpu-dense/gpu-b1}; N=${N/gpu-ram/gpu-ram-b1}; [[ $QB == *@* ]] && N=$N-$B
    if [[ -n $B ]]; then
      sed "s/^name: $P$/name: $N/; s/^gpu_budget: .*/gpu_budget: $B/; s/^  readers: 4/  readers: $READERS/" \
        configs/$P.yaml > /tmp/$N.yaml
    else
      sed "s/^name: $P$/name: $N/; s/^  cache_size: auto.*/  cache_slots: $SLOTS/; s/^  readers: 4/  readers: $READERS/" \
        configs/$P.yaml > /tmp/$N.yaml
    fi
    [[ $Q == *-noahead ]] && sed -i '/^  prefetch:/d' /tmp/$N.yaml
    python3 -m flashmoe policy show /tmp/$N.yaml -m /tmp/b1.gguf 2>&1 | tail -40 > "$OUT/policy-$N.txt" || true
    POLS+=(--policy /tmp/$N.yaml)
  done
  printf 'version: 1\nname: all-gpu\nrules:\n  - match: "*"\n    place: gpu\nruntime:\n  repack: false\n' > /tmp/all-gpu.yaml
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/vram.csv" 2>/dev/null &
  SMI=$!
  [[ ${GPU_B1_ALLGPU:-1} == 1 ]] && POLS+=(--policy /tmp/all-gpu.yaml)
  for v in ${GPU_B1_VS-stock-n-cpu-moe stock-mmap}; do POLS+=(--vs "$v"); done
  python3 -m flashmoe bench -m /tmp/b1.gguf "${POLS[@]}" -p 64 -n 128 --repeat "${GPU_B1_REPEAT:-1}" --threads 16 \
      --routing-trace /tmp/b1-uniform.trace --run-timeout 200 --json-out "$OUT/b1-gpu.json" | tee "$OUT/b1-gpu.md"
  kill $SMI 2>/dev/null || true
  log "bench done"
fi
