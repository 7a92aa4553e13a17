#!/usr/bin/env bash
# Side by side: per-request adapter scales on tailor (`adapters`) and on
# llama-server (`lora`), the same two PEFT adapters (converted to GGUF for
# llama.cpp), the same GGUF base, 2 threads each, alternating rounds. Every
# request composes both adapters at weight 0.5; each server's own base runs
# beside it, so each ratio is against the same server without adapters.
#
# usage: scripts/bench-compose-vs-llama-server.sh MODEL.gguf ADAPTER_DIR ADAPTER_DIR [ROUNDS]
# env:   LLAMA_SERVER (path to llama-server), TAILOR (default target/release/tailor),
#        PYTHON (with gguf, numpy, safetensors), PROMPT_TOKENS (128), MAX_TOKENS (64),
#        CONCURRENCY (8), REQUESTS (16)
set -euo pipefail
model="$1"
first="$2"
second="$3"
rounds="${4:-3}"
here="$(cd "$(dirname "$0")" && pwd)"
tailor="${TAILOR:-$here/../target/release/tailor}"
llama="${LLAMA_SERVER:?set LLAMA_SERVER to a llama-server binary}"
python="${PYTHON:-python3}"
prompt="${PROMPT_TOKENS:-128}"
gen="${MAX_TOKENS:-64}"
concurrency="${CONCURRENCY:-8}"
requests="${REQUESTS:-16}"
port=18124
id="$(basename "$model" .gguf)"

# shellcheck source=scripts/bench-common.sh
source "$here/bench-common.sh"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
names=()
for dir in "$first" "$second"; do
  name="$(basename "$dir")"
  names+=("$name")
  cp -r "$dir" "$work/$name"
  "$python" "$here/peft_to_gguf_lora.py" "$dir" "$work/$name.gguf" \
    --heads "$("$python" -c "import gguf,sys; r=gguf.GGUFReader(sys.argv[1]); print(int(r.fields['llama.attention.head_count'].parts[-1][0]))" "$model")" \
    --kv-heads "$("$python" -c "import gguf,sys; r=gguf.GGUFReader(sys.argv[1]); print(int(r.fields['llama.attention.head_count_kv'].parts[-1][0]))" "$model")" >/dev/null
done
list="$(IFS=,; echo "${names[*]}")"

run() { # name, extra bench flags for the composed run, then the server command
  local name="$1" flags="$2"; shift 2
  "$@" >/tmp/bench-server.log 2>&1 &
  local pid=$!
  wait_healthy
  for what in base composed; do
    local extra=()
    [ "$what" = composed ] && read -r -a extra <<<"$flags"
    line=$("$tailor" bench --url "http://127.0.0.1:$port" --model "$id" --prompt-tokens "$prompt" \
      --max-tokens "$gen" --concurrency "$concurrency" --requests "$requests" "${extra[@]}" | tail -1)
    echo "$name $what c=$concurrency: $line"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq "$rounds"); do
  echo "== round $round"
  run llama-server "--compose 2 --compose-adapters $list --llama-cpp-lora" \
    "$llama" -m "$model" --port "$port" -t 2 --parallel "$concurrency" -c 8192 --alias "$id" \
    --lora "$work/${names[0]}.gguf" --lora "$work/${names[1]}.gguf" --lora-init-without-apply
  run tailor "--compose 2 --compose-adapters $list" \
    "$tailor" serve --model "$model" --port "$port" --threads 2 --dtype quantized --adapters-dir "$work"
done
