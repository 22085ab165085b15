#!/usr/bin/env bash
cd "$(dirname "$0")/.."
export FLASHMOE_CACHE=${FLASHMOE_CACHE:-/tmp/fmc} PYTHONPATH=/tmp/site:$PWD
LIB=$(python3 -c "import importlib.util,os; print(os.path.dirname(importlib.util.find_spec('llama_cpp').origin))")/lib
echo "== exported libstdc++ symbols per library (plain wheel)"
python3 -m flashmoe build --backend cpu 2>&1 | tail -1
for f in libggml.so libggml-base.so libggml-cpu.so libllama.so; do echo "$f $(nm -D --defined-only $LIB/$f | grep -c '_ZNSo9_M_insert\|codecvt_utf8_base')"; done
echo "== static libstdc++ in the toolchain"; ls /opt/gcc/lib/gcc/x86_64-linux-gnu/13/ | grep -i "stdc\|supc" ; ls /opt/gcc/lib* 2>/dev/null | grep -i stdc | head
echo "== link line"; grep -m1 -o "libggml.so.*-o [^ ]*libggml.so[^ ]*" $FLASHMOE_CACHE/build/0.3.36-cpu-341f2cc2cf537075/build.log | head -c 600; echo
grep -m2 "static-libstdc\|static-libgcc" $FLASHMOE_CACHE/build/0.3.36-cpu-341f2cc2cf537075/build.log | head -c 400; echo
echo "== with --exclude-libs,ALL"
FLASHMOE_EXTRA_CMAKE_ARGS="-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" python3 -m flashmoe build --backend cpu 2>&1 | tail -1
for f in libggml.so libggml-base.so libggml-cpu.so libllama.so; do echo "$f $(nm -D --defined-only $LIB/$f | grep -c '_ZNSo9_M_insert\|codecvt_utf8_base')"; done
python3 -c "import numpy, llama_cpp; l=llama_cpp.Llama('/tmp/tiny.gguf', n_ctx=128, verbose=False); print('numpy first: loaded ok')" 2>&1 | tail -2
python3 scripts/gpu_check.py --cpu-only --tokens 8 2>&1 | tail -8
