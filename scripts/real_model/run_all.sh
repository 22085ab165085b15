#!/usr/bin/env bash
# The whole recipe: corpus -> tokenizer -> train -> convert -> check. See README.md beside this file.
#
#   scripts/real_model/run_all.sh                 everything here (CPU; MINUTES of training, default 1)
#   scripts/real_model/run_all.sh --prepare       here: only corpus + tokenizer (what --device needs carried)
#   scripts/real_model/run_all.sh --device        on the lent GPU machine: corpus (carried, checked),
#                                                 tokenizer (carried, checked), train (MINUTES, default 5);
#                                                 when $OUT is set the checkpoint is packed into it
#   scripts/real_model/run_all.sh --from DIR      here, after --device: unpack the checkpoint from DIR
#                                                 (the files that came back from $OUT), convert, check
#
# Environment: MINUTES (training budget), SEED (default 1234), WORK (default models/real_model),
# PYTHON (--device: default python3; otherwise the recipe venv that env.sh makes), TRAIN_ARGS (extra
# arguments for train.py), THREADS (CPU threads for training/checks here, default 1).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
cd "$REPO"
MODE=local
FROM=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) MODE=device ;;
        --prepare) MODE=prepare ;;
        --from) MODE=from; FROM="$2"; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
WORK="${WORK:-models/real_model}"
SEED="${SEED:-1234}"
THREADS="${THREADS:-1}"
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $*"; }

if [ "$MODE" = device ]; then
    PY="${PYTHON:-python3}"
    MINUTES="${MINUTES:-5}"
    export TOKENIZERS_PARALLELISM=true PYTHONUNBUFFERED=1
    "$PY" -c 'import torch, transformers, tokenizers; print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "transformers", transformers.__version__, "tokenizers", tokenizers.__version__)'
else
    # shellcheck source=env.sh
    source "$HERE/env.sh"
    PY="$RM_PY"
    MINUTES="${MINUTES:-1}"
    # keep this machine's load modest: the tokenizer trainer's thread pool too
    export PYTHONUNBUFFERED=1 RAYON_NUM_THREADS="$THREADS"
fi

if [ "$MODE" != from ]; then
    step "corpus"
    if [ "$MODE" = device ] && ! command -v apt-get >/dev/null; then
        "$PY" "$HERE/corpus.py" --out "$WORK/corpus" --check-only
    else
        "$PY" "$HERE/corpus.py" --out "$WORK/corpus"
    fi
    step "tokenizer"
    "$PY" "$HERE/tokenizer.py" --corpus "$WORK/corpus/corpus.txt" --out "$WORK/tokenizer"
    if [ "$MODE" = prepare ]; then
        step "ready for the GPU machine: carry $WORK/corpus and $WORK/tokenizer ($(du -sh "$WORK/corpus" "$WORK/tokenizer" | awk '{print $1}' | paste -sd+))"
        exit 0
    fi
    step "train ($MINUTES min, seed $SEED)"
    # shellcheck disable=SC2086
    "$PY" "$HERE/train.py" --corpus "$WORK/corpus/corpus.txt" --tokenizer "$WORK/tokenizer" \
        --out "$WORK/hf" --minutes "$MINUTES" --seed "$SEED" \
        $( [ "$MODE" = local ] && echo "--threads $THREADS" ) ${TRAIN_ARGS:-}
fi

if [ "$MODE" = device ]; then
    if [ -n "${OUT:-}" ]; then
        step "packing the checkpoint into $OUT (parts of 15 MiB: the device tool brings back files of at most 16 MiB)"
        mkdir -p "$OUT"
        # the tokenizer files are here already (they were carried); leave them out
        tar -C "$WORK/hf" --exclude='tokenizer*' --exclude='chat_template.jinja' -cf - . \
            | split -b 15M -d - "$OUT/ckpt.tar.part-"
        cp "$WORK/hf/train_log.json" "$WORK/hf/routing.json" "$OUT/"
        ls -l "$OUT"
    fi
    step "done in $(( $(date +%s) - T0 )) s"
    exit 0
fi

if [ "$MODE" = from ]; then
    step "unpacking the checkpoint from $FROM"
    [ -d "$FROM" ] || { echo "no folder $FROM" >&2; exit 1; }
    rm -rf "$WORK/hf.new" && mkdir -p "$WORK/hf.new"
    cat "$FROM"/ckpt.tar.part-* | tar -C "$WORK/hf.new" -xf -
    for f in tokenizer.json tokenizer_config.json chat_template.jinja tokenizer_info.json; do
        [ -f "$WORK/tokenizer/$f" ] && cp "$WORK/tokenizer/$f" "$WORK/hf.new/"
    done
    "$PY" - "$WORK/hf.new" <<'EOF'
import hashlib, json, sys
from pathlib import Path
d = Path(sys.argv[1])
log = json.loads((d / "train_log.json").read_text())
have = hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest()
if log["tokenizer_json_sha256"] != have:
    sys.exit(f"the checkpoint was trained with tokenizer {log['tokenizer_json_sha256'][:16]}, "
             f"but {d}/tokenizer.json is {have[:16]}")
print(f"trained on {log['device']}: {log['steps']} steps, {log['tokens_seen']:,} tokens, "
      f"{log['train_time_s']} s, best held-out loss {log['best_val_loss']}")
EOF
    rm -rf "$WORK/hf" && mv "$WORK/hf.new" "$WORK/hf"
fi

step "convert (llama.cpp's convert_hf_to_gguf.py from the cached sdist, then flashmoe quantize)"
"$PY" "$HERE/convert.py" --ckpt "$WORK/hf" --outdir "$WORK" --threads "$THREADS"
step "check (llama.cpp vs PyTorch)"
"$PY" "$HERE/check.py" --ckpt "$WORK/hf" --heldout "$WORK/corpus/heldout.txt" --threads "$THREADS" \
    "$WORK/model-f16.gguf" "$WORK/model-q8_0.gguf"
FLASHMOE="$REPO/.venv/bin/flashmoe"
[ -x "$FLASHMOE" ] || FLASHMOE=flashmoe
step "flashmoe inspect $WORK/model-q8_0.gguf"
"$FLASHMOE" inspect "$WORK/model-q8_0.gguf"
step "flashmoe generate -m $WORK/model-q8_0.gguf -p 'Once upon a time' -n 32"
"$FLASHMOE" generate -m "$WORK/model-q8_0.gguf" -p "Once upon a time" -n 32 --threads "$THREADS"
step "done in $(( $(date +%s) - T0 )) s: $WORK/model-q8_0.gguf ($(stat -c %s "$WORK/model-q8_0.gguf") bytes)"
