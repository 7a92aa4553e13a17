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
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT
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

bench() { # label, then extra bench flags
  local label="$1"; shift
  # One short request first: the first after start pays a warm-up.
  "$tailor" bench --url "http://127.0.0.1:$port" --model "$id" --prompt-tokens 16 --max-tokens 4 \
    --concurrency 1 --requests 1 --prompt-token-start 7000 "$@" >/dev/null
  line=$("$tailor" bench --url "http://127.0.0.1:$port" --model "$id" --prompt-tokens "$prompt" \
    --max-tokens "$gen" --concurrency "$concurrency" --requests "$requests" "$@" | tail -1)
  echo "$label c=$concurrency: $line"
}

serve() { # the server command; the server is left running as $pid
  "$@" >/tmp/bench-server.log 2>&1 &
  pid=$!
  wait_healthy
}

stop() {
  kill "$pid"; wait "$pid" 2>/dev/null || true
  pid=""
}

# Each base run is a server started without adapters: llama-server applies
# the adapters it loaded to requests that do not list them (this build
# ignores --lora-init-without-apply; a request's `lora` list sets the
# scales of the adapters it names and zeroes the others).
for round in $(seq "$rounds"); do
  echo "== round $round"
  serve "$llama" -m "$model" --port "$port" -t 2 --parallel "$concurrency" -c 8192 --alias "$id"
  bench "llama-server base"
  stop
  serve "$llama" -m "$model" --port "$port" -t 2 --parallel "$concurrency" -c 8192 --alias "$id" \
    --lora "$work/${names[0]}.gguf" --lora "$work/${names[1]}.gguf" --lora-init-without-apply
  bench "llama-server composed" --compose 2 --compose-adapters "$list" --llama-cpp-lora
  stop
  serve "$tailor" serve --model "$model" --port "$port" --threads 2 --dtype quantized --adapters-dir "$work"
  bench "tailor base"
  bench "tailor composed" --compose 2 --compose-adapters "$list"
  stop
done
