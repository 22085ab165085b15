#!/usr/bin/env bash
# Prepares .device-kit/ for the lent GPU machine (no network there; 64 MiB carry limit):
#   .device-kit/sdist/llama_cpp_python-0.3.36.tar.gz   the source package pruned of what the build never
#                                                      uses (76 MB -> a few MB): fetch_sdist takes it
#                                                      from $FLASHMOE_CACHE/sdist/
#   .device-kit/wheels/                                gguf, diskcache (+ the server's packages)
#   .device-kit/cuda-wheel/ (not made here)            a CUDA build brought back from a device call
#                                                      (scripts/device_wheel.sh); this script removes it.
#                                                      The checkout itself is ~33 MB (the bundled real
#                                                      model): the carry limit leaves ~25 MB for it
# Then, on the device (one call): bash scripts/device_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
KIT=.device-kit
rm -rf "$KIT" && mkdir -p "$KIT/sdist" "$KIT/wheels"
SDIST=$("$PY" -c "from flashmoe import build as B; print(B.fetch_sdist())")
TMP=$(mktemp -d)
tar xzf "$SDIST" -C "$TMP"
ROOT=$(ls -d "$TMP"/llama_cpp_python-*)
V=$ROOT/vendor/llama.cpp
# keep this list in step with the build (flashmoe/build.py: tools, tests, examples, server are off)
rm -rf "$ROOT/.git" "$V/.git" "$V"/{models,docs,media,benches,tests,scripts,conversion,gguf-py,examples,ui} \
       "$V"/ggml/src/ggml-{sycl,vulkan,opencl,cann,musa,hexagon,webgpu,zdnn,zendnn,openvino,virtgpu} \
       "$V"/tools/{server,ui,llama-bench,perplexity,tts,quantize,imatrix,cli,results}
(cd "$TMP" && tar czf "$OLDPWD/$KIT/sdist/$(basename "$SDIST")" "$(basename "$ROOT")")
rm -rf "$TMP"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    -d "$KIT/wheels" gguf==0.19.0 diskcache==5.6.3 2>/dev/null || \
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$KIT/wheels" gguf diskcache
du -sh "$KIT"/* >&2
echo "$KIT ready: run('bash scripts/device_run.sh', carry=['$KIT'])" >&2
