#!/usr/bin/env bash
# Diagnoses a crash at model load on the device: a native backtrace (no gdb there), and the same
# wheel built with AddressSanitizer (FLASHMOE_EXTRA_CMAKE_ARGS) run on the same load.
cd "$(dirname "$0")/.."
export FLASHMOE_CACHE=${FLASHMOE_CACHE:-/tmp/fmc} PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p "$FLASHMOE_CACHE/sdist"; cp -n .device-kit/sdist/*.tar.gz "$FLASHMOE_CACHE/sdist/" 2>/dev/null
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device-kit/wheels/*.whl 2>/dev/null
python3 -m flashmoe build --backend cpu 2>&1 | tail -1  # the plain wheel (cached when the machine is warm)
python3 -c "from gguf_tools.synth import make_spec, synth_model; synth_model('/tmp/tiny.gguf', make_spec('qwen3moe','tiny',seed=0), progress=False)"
gcc -shared -fPIC -O1 -o /tmp/segv_bt.so scripts/segv_backtrace.c -ldl
LOAD="import llama_cpp; l=llama_cpp.Llama('/tmp/tiny.gguf', n_ctx=128, verbose=False); print('loaded ok')"
echo "== native backtrace"; LD_PRELOAD=/tmp/segv_bt.so python3 -c "$LOAD" 2>&1 | tail -30
echo "== compile flags of the wheel"; grep -m3 -o "\-march=[a-z0-9-]*\|-D_GLIBCXX[A-Z_=0-9]*\|-std=[a-z+0-9]*" $FLASHMOE_CACHE/build/*/build.log | sort | uniq -c | head
echo "== compiler"; cat /opt/gcc/bin/g++ 2>/dev/null | head -20
if [ "${ASAN:-1}" = 1 ]; then
  echo "== ASan wheel"
  FLASHMOE_EXTRA_CMAKE_ARGS="-DCMAKE_C_FLAGS=-fsanitize=address\ -fno-omit-frame-pointer -DCMAKE_CXX_FLAGS=-fsanitize=address\ -fno-omit-frame-pointer -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address" \
    python3 -m flashmoe build --backend cpu 2>&1 | tail -1
  LIBASAN=$(${CC:-gcc} -print-file-name=libasan.so)
  LD_PRELOAD=$LIBASAN ASAN_OPTIONS=detect_leaks=0:log_path=$OUT/asan python3 -c "$LOAD" > "$OUT/asan-run.txt" 2>&1
  head -70 "$OUT"/asan.* 2>/dev/null
fi
