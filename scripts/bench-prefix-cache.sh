#!/usr/bin/env bash
# Prefix caching side by side: tailor and llama-server on the same GGUF, 2
# threads each, a fresh server per workload, alternating rounds. Prompts
# share a fixed preamble and differ in their tails (`tailor bench
# --shared-prefix-tokens`), 32 generated tokens each (greedy, streaming,
# ignore_eos). Prints one summary line per measurement.
#
# Workloads:
#   sequential  one client, 8 requests: the first (cold), then 7 repeats
#   waves       8 concurrent clients, then 8 more with new tails
#   adapter     sequential, on a LoRA adapter (llama-server: --lora, per request)
#   preset      tailor only: a preset binding a ~1,000-token few-shot template
#               and the adapter, over chat; first request, then 7 repeats
#
# usage: scripts/bench-prefix-cache.sh MODEL.gguf [ROUNDS]
# env:   LLAMA_SERVER (path to llama-server; unset: tailor only),
#        ADAPTER (PEFT folder, default adapters/pirate), ADAPTER_GGUF (the same
#        adapter converted by scripts/peft_to_gguf_lora.py, for llama-server),
#        TAILOR (default target/release/tailor), PREAMBLE_TOKENS (1000)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
model="$1"
rounds="${2:-1}"
tailor="${TAILOR:-$here/target/release/tailor}"
llama="${LLAMA_SERVER:-}"
adapter="${ADAPTER:-$here/adapters/pirate}"
preamble="${PREAMBLE_TOKENS:-1000}"
port=18124
id="$(basename "$model" .gguf)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# tailor's side: the adapter as "pirate", and a preset binding it to a
# few-shot template whose fixed part is about a thousand tokens.
mkdir -p "$work/adapters" "$work/templates" "$work/presets"
ln -s "$adapter" "$work/adapters/pirate"
{
  printf '{#-\ndescription = "Few-shot support triage"\ninput = "text"\n[variables.text]\nrequired = true\n-#}\n'
  printf 'You sort messages sent to the support desk of a shipping company into one queue each.\n'
  for i in $(seq 1 24); do
    printf '\nMessage %d: My parcel number %d was due on day %d but the tracking page has shown the same depot for a week, and nobody answers the phone at the office in town.\n' "$i" "$((7000 + i * 37))" "$i"
    printf 'Queue: %s\n' "$( [ $((i % 3)) = 0 ] && echo delays || ([ $((i % 3)) = 1 ] && echo tracking || echo contact))"
  done
  printf '\nMessage: {{ text }}\nQueue:'
} >"$work/templates/triage.jinja"
printf '[triage-pirate]\nadapter = "pirate"\ntemplate = "triage"\n' >"$work/presets/presets.toml"

# shellcheck source=scripts/bench-common.sh
source "$(dirname "$0")/bench-common.sh"

start() { # the server command
  "$@" >"$work/server.log" 2>&1 &
  pid=$!
  wait_healthy
}

stop() {
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

bench() { # label, then bench flags
  local label="$1"; shift
  local line
  line=$("$tailor" bench --url "http://127.0.0.1:$port" --shared-prefix-tokens "$preamble" \
    --prompt-tokens 16 --max-tokens 32 "$@" | tail -1)
  echo "$name $label: $line"
}

sequential() { # model, then extra bench flags
  local m="$1"; shift
  bench "$workload first" --model "$m" --concurrency 1 --requests 1 "$@"
  bench "$workload next 7" --model "$m" --concurrency 1 --requests 7 --first-request 1 "$@"
}

run_tailor() {
  name=tailor
  local serve=("$tailor" serve --model "$model" --port "$port" --threads 2 --dtype quantized --adapters-dir "$work/adapters"
    --templates-dir "$work/templates" --presets "$work/presets")
  workload=sequential; start "${serve[@]}"; sequential "$id"; stop
  workload=waves; start "${serve[@]}"
  bench "waves 1" --model "$id" --concurrency 8 --requests 8
  bench "waves 2" --model "$id" --concurrency 8 --requests 8 --first-request 8
  stop
  workload=adapter; start "${serve[@]}"; sequential pirate; stop
  workload=preset; start "${serve[@]}"
  # Chat: the preset renders each request's distinct words into its template.
  name=tailor
  local line
  line=$("$tailor" bench --url "http://127.0.0.1:$port" --endpoint chat --model triage-pirate \
    --prompt-tokens 12 --max-tokens 32 --concurrency 1 --requests 1 | tail -1)
  echo "tailor preset first: $line"
  line=$("$tailor" bench --url "http://127.0.0.1:$port" --endpoint chat --model triage-pirate \
    --prompt-tokens 12 --max-tokens 32 --concurrency 1 --requests 7 --first-request 1 | tail -1)
  echo "tailor preset next 7: $line"
  stop
}

run_llama() {
  name=llama-server
  local serve=("$llama" -m "$model" --port "$port" -t 2 --alias "$id")
  workload=sequential; start "${serve[@]}" --parallel 1 -c 4096; sequential "$id"; stop
  workload=waves; start "${serve[@]}" --parallel 8 -c 16384
  bench "waves 1" --model "$id" --concurrency 8 --requests 8
  bench "waves 2" --model "$id" --concurrency 8 --requests 8 --first-request 8
  stop
  if [ -n "${ADAPTER_GGUF:-}" ]; then
    workload=adapter; start "${serve[@]}" --parallel 1 -c 4096 --lora "$ADAPTER_GGUF" --lora-init-without-apply
    sequential "$id" --llama-cpp-lora
    stop
  fi
}

for round in $(seq "$rounds"); do
  echo "== round $round"
  if [ -n "$llama" ]; then run_llama; fi
  run_tailor
done
