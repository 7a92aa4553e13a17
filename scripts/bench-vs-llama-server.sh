#!/usr/bin/env bash
# Side-by-side: tailor and llama-server on the same GGUF, 2 threads each,
# alternating rounds, the same `tailor bench` workload (distinct token-id
# prompts, greedy, streaming, ignore_eos). Prints one summary line per run.
#
# usage: scripts/bench-vs-llama-server.sh MODEL.gguf [ROUNDS]
# env:   LLAMA_SERVER (path to llama-server), TAILOR (default target/release/tailor),
#        PROMPT_TOKENS (128), MAX_TOKENS (64)
set -euo pipefail
model="$1"
rounds="${2:-3}"
tailor="${TAILOR:-$(dirname "$0")/../target/release/tailor}"
llama="${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
prompt="${PROMPT_TOKENS:-128}"
gen="${MAX_TOKENS:-64}"
port=18123
id="$(basename "$model" .gguf)"

# shellcheck source=scripts/bench-common.sh
source "$(dirname "$0")/bench-common.sh"

run() { # name, then the server command
  local name="$1"; shift
  "$@" >/tmp/bench-server.log 2>&1 &
  local pid=$!
  wait_healthy
  # The first request after start, alone: does the server pay a warm-up?
  first=$("$tailor" bench --url "http://127.0.0.1:$port" --model "$id" --prompt-tokens "$prompt" \
    --max-tokens 8 --concurrency 1 --requests 1 --prompt-token-start 7000 | tail -1)
  echo "$name first-request: $first"
  for c in 1 8; do
    n=$([ "$c" = 1 ] && echo 4 || echo 16)
    line=$("$tailor" bench --url "http://127.0.0.1:$port" --model "$id" --prompt-tokens "$prompt" \
      --max-tokens "$gen" --concurrency "$c" --requests "$n" | tail -1)
    rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    echo "$name c=$c: $line | VmHWM ${rss} kB"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq "$rounds"); do
  echo "== round $round"
  run llama-server "$llama" -m "$model" --port "$port" -t 2 --parallel 8 -c 8192 --alias "$id"
  # No adapters: the shipped demo ones are for SmolLM2.
  # The quantized path llama-server runs too (--dtype auto would widen a small model to float32).
  run tailor "$tailor" serve --model "$model" --port "$port" --threads 2 --dtype quantized --adapters-dir "$(mktemp -d)"
done
