#!/usr/bin/env bash
# B1 on one host vs split across this host and 2 RPC workers on loopback (docs/rpc.md), with the network
# bytes per token. Writes the model and the uniform routing trace if missing, starts two `flashmoe
# rpc-server` workers on free loopback ports, runs each configuration in a fresh process (greedy, the
# routing forced from the trace), and writes a markdown table and the JSON of every run.
#
#   scripts/rpc_bench.sh                       # results in results/rpc-b1-DATE/README.md
#   RPC_BENCH_TOKENS=64 scripts/rpc_bench.sh
#
# Configurations (RPC_BENCH_CONFIGS, default all three):
#   one-host        every layer here: dense weights in RAM, experts streamed through the expert cache
#   split-resident  layers 0-7 here (experts streamed), 8-15 on w1 and 16-23 on w2 with all their weights
#                   in the workers' RAM (sent once at load): only activations cross the network per token
#   split-stream    layers split the same way, every layer's experts streamed from this host's disk: the
#                   remote layers' expert caches live on the workers, each miss is sent over the network
#
# Settings (environment):
#   RPC_BENCH_MODEL    the model (default models/b1.gguf; written by `flashmoe synth --preset bench` if missing)
#   RPC_BENCH_TRACE    routing trace (default models/b1-uniform.trace, written if missing; "none": the
#                      model's own routing, which for B1's random weights picks the same experts every token)
#   RPC_BENCH_PROMPT   prompt tokens (default 8: a uniform-trace prefill reads most experts of every layer)
#   RPC_BENCH_TOKENS   generated tokens (default 32; the first ends the prefill, the others are the decode)
#   RPC_BENCH_SLOTS    expert cache slots per layer (default 32 of 128: about the hit rate of B1 at 2 GiB)
#   RPC_BENCH_THREADS  threads of this host and of each worker (default 2)
#   RPC_BENCH_OUT      output folder (default results/rpc-b1-YYYYmmdd-HHMMSS)
#
# Forced routing (a trace) and streaming put flashmoe's custom graph ops into the graph: with remote layers the
# build's RPC backend must keep them on this host (the ggml-rpc change in docs/rpc.md); a build without it
# refuses such runs with a one-line error before anything is sent.
# Weight repacking is off in every configuration: a worker's weights are never repacked, so all runs use the
# same kernels and must generate the same tokens (checked).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
FLASHMOE=("$PY" -m flashmoe)

MODEL=${RPC_BENCH_MODEL:-models/b1.gguf}
TRACE=${RPC_BENCH_TRACE:-models/b1-uniform.trace}
PROMPT=${RPC_BENCH_PROMPT:-8}
TOKENS=${RPC_BENCH_TOKENS:-32}
SLOTS=${RPC_BENCH_SLOTS:-32}
THREADS=${RPC_BENCH_THREADS:-2}
CONFIGS=${RPC_BENCH_CONFIGS:-one-host split-resident split-stream}
OUT=${RPC_BENCH_OUT:-results/rpc-b1-$(date +%Y%m%d-%H%M%S)}

mkdir -p "$OUT" "$(dirname "$MODEL")"
t_start=$(date +%s)
log() { echo "[rpc-bench $(( $(date +%s) - t_start ))s] $*" >&2; }

if [[ ! -f "$MODEL" ]]; then
    log "writing the B1 model to $MODEL"
    "${FLASHMOE[@]}" synth --arch qwen3moe --preset bench --seed 0 -o "$MODEL"
fi
if [[ "$TRACE" != "none" && ! -f "$TRACE" ]]; then
    log "writing the uniform routing trace $TRACE"
    "${FLASHMOE[@]}" trace gen -m "$MODEL" --kind uniform --tokens 256 --seed 0 -o "$TRACE"
fi

# two workers on free loopback ports, stopped on exit
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
ports=()
for w in 1 2; do
    port=$("$PY" -c 'from flashmoe.rpc import free_port; print(free_port())')
    "${FLASHMOE[@]}" rpc-server --port "$port" --threads "$THREADS" > "$OUT/worker$w.log" 2>&1 &
    pids+=($!)
    ports+=("$port")
    "$PY" -c "from flashmoe.rpc import wait_listening; wait_listening('127.0.0.1', $port, 60)"
    log "worker w$w: rpc://127.0.0.1:$port (pid ${pids[-1]})"
done

experts='  - match: "blk.*.ffn_{gate,up,down}_exps.weight"
    place: stream'
remote='  - match: "blk.{8..15}.*"
    place: w1
  - match: "blk.{16..23}.*"
    place: w2'
tail_rules='  - match: "*"
    place: ram
expert_cache:
  mode: cache
  cache_slots: '"$SLOTS"'
  eviction: lru
  readers: 4
  direct_io: true
runtime:
  n_ctx: 512
  threads: '"$THREADS"'
  repack: false'
devices="devices:
  w1: rpc://127.0.0.1:${ports[0]}
  w2: rpc://127.0.0.1:${ports[1]}"

for cfg in $CONFIGS; do
    pol="$OUT/$cfg.yaml"
    case "$cfg" in
        one-host)       printf 'name: %s\nrules:\n%s\n%s\n' "$cfg" "$experts" "$tail_rules" > "$pol" ;;
        split-resident) printf 'name: %s\n%s\nrules:\n%s\n%s\n%s\n' "$cfg" "$devices" "$remote" "$experts" "$tail_rules" > "$pol" ;;
        split-stream)   printf 'name: %s\n%s\nrules:\n%s\n%s\n%s\n' "$cfg" "$devices" "$experts" "$remote" "$tail_rules" > "$pol" ;;
        *) echo "unknown configuration $cfg" >&2; exit 2 ;;
    esac
    "${FLASHMOE[@]}" policy show "$pol" -m "$MODEL" > "$OUT/$cfg-plan.txt"
    log "$cfg: $PROMPT prompt tokens, $TOKENS generated"
    "$PY" - "$MODEL" "$pol" "$TRACE" "$PROMPT" "$TOKENS" "$OUT/$cfg.json" "$cfg" <<'EOF'
import json, sys, time
from flashmoe import rpc
from flashmoe.engine import Engine
from flashmoe.policy import load_policy

model, policy, trace, n_prompt, n_tokens, out, cfg = sys.argv[1:8]
settings = load_policy(policy).resolve(model).engine_settings()
t0 = time.perf_counter()
e = Engine(model, settings=settings, routing_trace=None if trace == "none" else trace)
load_s = time.perf_counter() - t0
load_net = rpc.connection_bytes(e.remote.addresses) if e.remote else {}
words = e.tokenize("The quick brown fox jumps over the lazy dog. " * 8, add_bos=False)
prompt = words[: int(n_prompt)]
r = rpc.measure(e, prompt, int(n_tokens))
r.update(config=cfg, load_s=load_s, mode=e.mode_line(), load_net_sent=sum(v[0] for v in load_net.values()))
json.dump(r, open(out, "w"), indent=1)
print(f"{cfg}: decode {r['decode_tok_s']:.2f} tok/s, network {r['decode_net_sent_per_token'] / 2**20:.2f} MiB "
      f"sent + {r['decode_net_received_per_token'] / 2**20:.3f} MiB received per token", file=sys.stderr)
EOF
done

"$PY" - "$OUT" $CONFIGS > "$OUT/README.md" <<'EOF'
import json, os, sys
out, cfgs = sys.argv[1], sys.argv[2:]
runs = {c: json.load(open(os.path.join(out, c + ".json"))) for c in cfgs if os.path.exists(os.path.join(out, c + ".json"))}
MiB = 2 ** 20
ref = runs.get("one-host", {}).get("tokens")
print(f"# B1 on one host vs split over RPC on loopback ({os.uname().nodename}, {os.cpu_count()} cores)\n")
print("| configuration | decode tok/s | prefill tok/s | expert reads MiB/token | network sent MiB/token "
      "| network received KiB/token | replies from workers /token | bytes-bound at 10 GbE tok/s "
      "| bytes-bound at 25 GbE tok/s | cache hit rate | load s | load sent MiB | same tokens as one-host |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for c, r in runs.items():
    per_tok = r["decode_net_sent_per_token"] + r["decode_net_received_per_token"]
    bound = lambda gbit: (gbit * 1e9 / 8 / per_tok) if per_tok else float("inf")
    hit = f"{r['hit_rate'] * 100:.1f}%" if r.get("hit_rate") is not None else "-"
    same = "-" if ref is None or c == "one-host" else ("yes" if r["tokens"] == ref else "NO")
    b10, b25 = ("-", "-") if not per_tok else (f"{bound(10):.1f}", f"{bound(25):.1f}")
    print(f"| {c} | {r['decode_tok_s']:.2f} | {r['prefill_tok_s']:.2f} | {r['decode_expert_read_per_token'] / MiB:.1f} "
          f"| {r['decode_net_sent_per_token'] / MiB:.2f} | {r['decode_net_received_per_token'] / 1024:.1f} "
          f"| {r.get('decode_segments_in_per_token', 0):.0f} | {b10} | {b25} "
          f"| {hit} | {r['load_s']:.1f} | {r.get('load_net_sent', 0) / MiB:.0f} | {same} |")
print()
for c, r in runs.items():
    print(f"- {c}: {r['mode']}; {r['prompt_tokens']} prompt tokens, {r['generated_tokens']} generated; prefill "
          f"network {r['prefill_net_sent'] / MiB:.1f} MiB sent")
EOF
log "done: $OUT/README.md"
cat "$OUT/README.md"
