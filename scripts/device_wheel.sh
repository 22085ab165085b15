#!/usr/bin/env bash
# Carry a built llama.cpp wheel between device calls, so that a cold machine installs it in seconds
# instead of compiling CUDA for ~4 minutes of the session's device time.
#   scripts/device_wheel.sh export DIR   the newest wheel in $FLASHMOE_CACHE/wheels/ as parts of at most
#                                        15 MiB in DIR (the device tool returns files of up to 16 MiB, 8 per
#                                        call, so run it in a call that writes little else under $OUT)
#   scripts/device_wheel.sh import DIR   the parts in DIR back into $FLASHMOE_CACHE/wheels/KEY/, where
#                                        `flashmoe build` finds a build of the same key (patch hash, backend,
#                                        CMake arguments) and installs it; a stale key is simply not used
# Parts are named KEY__WHEEL.part-NN (letters, digits, '.', '_' and '-' only, as the tool requires).
# Here: copy what came back into .device-kit/cuda-wheel/ (carried with .device-kit), e.g.
#   mkdir -p .device-kit/cuda-wheel && cp /work/.device/N/wheel/* .device-kit/cuda-wheel/
set -euo pipefail
CACHE=${FLASHMOE_CACHE:-$HOME/.cache/flashmoe}
verb=${1:-}; dir=${2:-}
[[ -n $verb && -n $dir ]] || { echo "usage: $0 export|import DIR" >&2; exit 2; }
case $verb in
  export)
    whl=$(ls -t "$CACHE"/wheels/*/llama_cpp_python-*.whl 2>/dev/null | head -1)
    [[ -n $whl ]] || { echo "device_wheel: no built wheel under $CACHE/wheels" >&2; exit 1; }
    key=$(basename "$(dirname "$whl")")
    mkdir -p "$dir"
    split -b 15M -d -a 2 "$whl" "$dir/${key}__$(basename "$whl").part-"
    echo "device_wheel: $(basename "$whl") of build $key, $(du -m "$whl" | cut -f1) MiB, in $(ls "$dir" | wc -l) part(s)"
    ;;
  import)
    shopt -s nullglob
    parts=("$dir"/*__*.whl.part-*)
    [[ ${#parts[@]} -gt 0 ]] || { echo "device_wheel: no wheel parts in $dir"; exit 0; }
    base=$(basename "${parts[0]}"); base=${base%.part-*}
    key=${base%%__*}; name=${base#*__}
    mkdir -p "$CACHE/wheels/$key"
    cat "$dir/$base".part-* > "$CACHE/wheels/$key/$name.tmp"
    python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).testzip()" "$CACHE/wheels/$key/$name.tmp"
    mv "$CACHE/wheels/$key/$name.tmp" "$CACHE/wheels/$key/$name"
    echo "device_wheel: $name of build $key placed in $CACHE/wheels/$key"
    ;;
  *) echo "usage: $0 export|import DIR" >&2; exit 2 ;;
esac
