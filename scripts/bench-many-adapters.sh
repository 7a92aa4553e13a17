#!/usr/bin/env bash
# S-LoRA's workload at several adapter counts, side by side in one run: a
# fresh server per count (adapters loaded by name from one folder, within
# one memory budget), Poisson arrivals at one rate, power-law popularity,
# drawn lengths. Prints one line per count and, at the end, a Markdown table.
#
# Then the cost of one cold load: ten rank-16 adapters over all seven modules,
# each asked for once cold and once warm (one request at a time, 16-token
# prompts, one token), first-token medians.
#
# usage: scripts/bench-many-adapters.sh MODEL.gguf [COUNTS...]   (default 5 50 500 5000)
# env:   ADAPTERS (folder of the random adapters, made if short; default
#        /tmp/tailor-many-adapters), RANKS (8-64), MODULES (q,v), BUDGET
#        (--adapter-memory, 200MiB), RATE (req/s, 4), DURATION (s, 60),
#        PROMPTS (8:128), OUTPUTS (8:128), ALPHA (1), SEED (1),
#        THREADS (2), TAILOR (default target/release/tailor)
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
model="$1"
shift
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(5 50 500 5000)
tailor="${TAILOR:-$here/target/release/tailor}"
adapters="${ADAPTERS:-/tmp/tailor-many-adapters}"
budget="${BUDGET:-200MiB}"
port=18131
work="$(mktemp -d)"
trap 'kill "${pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

# shellcheck source=scripts/bench-common.sh
source "$(dirname "$0")/bench-common.sh"

largest=$(printf '%s\n' "${counts[@]}" | sort -n | tail -1)
have=$(find "$adapters" -maxdepth 1 -name 'a*' -type d 2>/dev/null | wc -l)
if [ "$have" -lt "$largest" ]; then
  echo "writing $largest random adapters (ranks ${RANKS:-8-64}, modules ${MODULES:-q,v}) to $adapters" >&2
  "$tailor" random-adapters --model "$model" --out "$adapters" --count "$largest" \
    --ranks "${RANKS:-8-64}" --modules "${MODULES:-q,v}" --prefix a --seed "${SEED:-1}" >&2
fi

rows=()
for n in "${counts[@]}"; do
  "$tailor" serve --model "$model" --dtype quantized --threads "${THREADS:-2}" --port "$port" \
    --adapters-dir "$work/none" --lora-root "$adapters" --resolve-adapters \
    --adapter-memory "$budget" >"$work/server-$n.log" 2>&1 &
  pid=$!
  wait_healthy
  rss_idle=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  "$tailor" bench --url "http://127.0.0.1:$port" --adapters "$n" --adapter-prefix a \
    --alpha "${ALPHA:-1}" --rate "${RATE:-4}" --duration "${DURATION:-60}" \
    --prompt-tokens-range "${PROMPTS:-8:128}" --max-tokens-range "${OUTPUTS:-8:128}" \
    --seed "${SEED:-1}" --time-limit 1200 >"$work/bench-$n.out"
  load_ms=$(curl -sf "http://127.0.0.1:$port/metrics" | awk '
    /^tailor_adapter_load_seconds_sum/ {s += $2} /^tailor_adapter_load_seconds_count/ {c += $2}
    END {printf "%.1f", c ? 1000 * s / c : 0}')
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "N=$n: $(tail -1 "$work/bench-$n.out") | rss idle $((rss_idle / 1024)) MiB, end $((rss / 1024)) MiB, peak $((hwm / 1024)) MiB, mean adapter load $load_ms ms"
  rows+=("$(python3 - "$work/bench-$n.out" "$n" "$rss" "$hwm" "$load_ms" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
s = json.loads(text[: text.rstrip().rfind("\n")])
n, rss, hwm, load = sys.argv[2], int(sys.argv[3]) / 1024, int(sys.argv[4]) / 1024, sys.argv[5]
a = s.get("server") or {}
f = lambda v: "-" if v is None else f"{v:.0f}"
print(f"| {n} | {s['requests_per_s']:.2f} | {s['generated_tokens_per_s']:.1f} | {f(s['ttft_ms_p50'])} | {f(s['ttft_ms_p95'])} "
      f"| {f(s['itl_ms_p50'])} | {f(s['itl_ms_p99'])} | {s['slo_attainment'] * 100:.0f}% | {a.get('adapter_loads', 0):.0f} "
      f"| {a.get('adapter_evictions', 0):.0f} | {load} | {a.get('adapter_bytes_resident', 0) / 2**20:.0f} MiB | {rss:.0f} / {hwm:.0f} MiB |")
PY
)")
done

# Cold against warm: the same adapter's first request and its second.
cold="$adapters-cold"
if [ "$(find "$cold" -maxdepth 1 -name 'c*' -type d 2>/dev/null | wc -l)" -lt 11 ]; then
  "$tailor" random-adapters --model "$model" --out "$cold" --count 11 --ranks 16 --modules all --prefix c --seed 2 >&2
fi
"$tailor" serve --model "$model" --dtype quantized --threads "${THREADS:-2}" --port "$port" \
  --adapters-dir "$work/none" --lora-root "$cold" --resolve-adapters >"$work/server-cold.log" 2>&1 &
pid=$!
wait_healthy
ttft() { # model, first request number
  "$tailor" bench --url "http://127.0.0.1:$port" --model "$1" --concurrency 1 --requests 1 \
    --prompt-tokens 16 --max-tokens 1 --first-request "$2" | python3 -c '
import json, sys
text = sys.stdin.read()
print(json.loads(text[: text.rstrip().rfind("\n")])["ttft_ms_p50"])'
}
ttft c10 900 >/dev/null # the first request after start pays for more than its adapter
cold_ms=() warm_ms=()
for i in $(seq 0 9); do
  cold_ms+=("$(ttft "c$i" $((1000 + 2 * i)))")
  warm_ms+=("$(ttft "c$i" $((1001 + 2 * i)))")
done
kill "$pid"
wait "$pid" 2>/dev/null || true
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
cold_p50=$(median "${cold_ms[@]}")
warm_p50=$(median "${warm_ms[@]}")

echo
echo "cold load of a rank-16 adapter over all seven modules: TTFT p50 cold $cold_p50 ms, warm $warm_p50 ms," \
  "difference $(python3 -c "print(round($cold_p50 - $warm_p50, 1))") ms (ten adapters)"
echo
echo "| adapters | req/s | tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p99 ms | SLO | loads | evictions | load ms (mean) | adapter bytes | RSS end / peak |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
