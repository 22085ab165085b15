#!/usr/bin/env bash
# Reproduces the reference benchmark B1 (shared/BENCHMARK.md; docs/BENCHMARKS.md says how to read it)
# from scratch: writes the B1 model if it is missing, the two routing traces, then runs `flashmoe
# bench` with the B1 configurations at a 2 GiB budget, once per trace.
#
#   scripts/b1.sh                      # results in results/b1-DATE/ (markdown, JSON, trace stats)
#   B1_REPEAT=5 B1_RUN_TIMEOUT=1800 scripts/b1.sh
#
# Settings (environment):
#   B1_MODEL        the model (default models/b1.gguf; written by `flashmoe synth --preset bench` if missing)
#   B1_OUT          output folder (default results/b1-YYYYmmdd-HHMMSS)
#   B1_RAM_LIMIT    memory budget of every run (default 2GiB)
#   B1_REPEAT       runs of each configuration, in alternation (default 3)
#   B1_RUN_TIMEOUT  seconds before a run is killed and reported as TIMEOUT with its partial decode
#                   rate (default 90: stock-mmap and stock-lazy need 10+ minutes for 128 tokens under
#                   the uniform trace at 2 GiB; 90 s keeps the whole script near 25 minutes on a
#                   2-core machine; use 1800 for complete stock runs)
#   B1_TRACES       traces to run (default "uniform realistic")
#   B1_POLICIES     policies to measure (default "stream"; add a tuned YAML here, e.g.
#                   "stream results/tuned-2GiB.yaml")
#   B1_TUNE_TIME    when set (e.g. 5m): also run `flashmoe tune` for each trace at the budget with
#                   this time limit and add the policy it writes (the `tuned` configuration of B1);
#                   off by default to keep the script near 25 minutes (each tune adds its time limit
#                   plus 3 more runs)
#   B1_THREADS      threads (default 2)
#   B1_DROP_CACHES  1 (default): drop the page cache before each run (needs root; the bench says so
#                   when it cannot and evicts the model file instead)
#
# Needs: a built flashmoe (`flashmoe build`), a writable memory cgroup (root with cgroup v1, or a
# delegated cgroup v2 subtree), about 9 GB of disk for the model, 24 GiB RAM for the unconfined
# reference run to be fast (it works with less, slower).
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -x .venv/bin/flashmoe ]]; then FLASHMOE=${FLASHMOE:-.venv/bin/flashmoe}; else FLASHMOE=${FLASHMOE:-flashmoe}; fi

MODEL=${B1_MODEL:-models/b1.gguf}
OUT=${B1_OUT:-results/b1-$(date +%Y%m%d-%H%M%S)}
LIMIT=${B1_RAM_LIMIT:-2GiB}
REPEAT=${B1_REPEAT:-3}
RUN_TIMEOUT=${B1_RUN_TIMEOUT:-90}
TRACES=${B1_TRACES:-uniform realistic}
POLICIES=${B1_POLICIES:-stream}
THREADS=${B1_THREADS:-2}
TUNE_TIME=${B1_TUNE_TIME:-}
DROP=${B1_DROP_CACHES:-1}

mkdir -p "$OUT" "$(dirname "$MODEL")"
t_start=$(date +%s)
log() { echo "[b1 $(( $(date +%s) - t_start ))s] $*" >&2; }

# 1. the model
if [[ ! -f "$MODEL" ]]; then
    log "writing the B1 model to $MODEL (flashmoe synth --arch qwen3moe --preset bench)"
    "$FLASHMOE" synth --arch qwen3moe --preset bench --seed 0 -o "$MODEL"
fi
"$FLASHMOE" inspect "$MODEL" > "$OUT/model.txt" 2>&1 || true

# 2. the traces (512 tokens: a 64-token prompt and 128 generated tokens use the first 192 rows)
base="${MODEL%.gguf}"
for kind in $TRACES; do
    tr="$base-$kind.trace"
    if [[ ! -f "$tr" ]]; then
        log "writing the $kind routing trace $tr"
        "$FLASHMOE" trace gen -m "$MODEL" --kind "$kind" --tokens 512 --seed 0 -o "$tr"
    fi
    "$FLASHMOE" trace stats "$tr" | tee "$OUT/trace-$kind.txt" >&2
done

# 3. the bench, once per trace
pol_args=()
for p in $POLICIES; do pol_args+=(--policy "$p"); done
drop_args=()
[[ "$DROP" == "1" ]] && drop_args+=(--drop-caches)
for kind in $TRACES; do
    tuned_args=()
    if [[ -n "$TUNE_TIME" ]]; then
        log "tune, $kind routing, budget $LIMIT, time limit $TUNE_TIME"
        "$FLASHMOE" tune -m "$MODEL" --ram "$LIMIT" --trace "$base-$kind.trace" --time-limit "$TUNE_TIME" \
            --threads "$THREADS" -o "$OUT/tuned-$kind.yaml" --report "$OUT/tune-$kind.md" >&2
        tuned_args+=(--policy "$OUT/tuned-$kind.yaml")
    fi
    log "bench, $kind routing, budget $LIMIT, $REPEAT rounds, run timeout ${RUN_TIMEOUT}s"
    "$FLASHMOE" bench -m "$MODEL" ${pol_args[@]+"${pol_args[@]}"} ${tuned_args[@]+"${tuned_args[@]}"} --vs stock --ram-limit "$LIMIT" ${drop_args[@]+"${drop_args[@]}"} \
        -p 64 -n 128 --repeat "$REPEAT" --threads "$THREADS" --routing-trace "$base-$kind.trace" \
        --run-timeout "$RUN_TIMEOUT" --json-out "$OUT/b1-$kind.json" | tee "$OUT/b1-$kind.md"
done

{
    echo "# B1 ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "nproc $(nproc), $(grep MemTotal /proc/meminfo 2>/dev/null | awk '{printf "%.1f GiB RAM", $2/1048576}')"
    echo
    for kind in $TRACES; do cat "$OUT/b1-$kind.md"; echo; done
} > "$OUT/README.md"
log "done in $(( $(date +%s) - t_start )) s: $OUT/README.md"
