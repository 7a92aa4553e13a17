#!/usr/bin/env bash
# Training speed, tailor train against PEFT + torch on the same data and
# recipe (release build; tokens exclude padding; median over the steps after
# the first two; peak RSS of the whole process).
#
#   scripts/bench-train.sh [MODEL.gguf] [THREADS] [STEPS]
#   PEFT_PYTHON=/path/to/venv/bin/python scripts/bench-train.sh   # also PEFT
#
# PEFT's side needs `pip install torch transformers peft gguf` in the
# interpreter PEFT_PYTHON names (not a dependency of the project).
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-$HOME/.cache/tailor/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
threads="${2:-2}"
steps="${3:-12}"
data=tests/fixtures/smollm2/train
cargo build --release --quiet
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

recipes=(
  "pirate|$data/pirate.jsonl|--rank 8 --alpha 16 --target-modules q_proj,v_proj"
  "json|$data/json.jsonl|--rank 4 --alpha 8 --use-rslora --target-modules q_proj,k_proj,v_proj,o_proj"
  "r12-all|$data/pirate.jsonl|--rank 12 --alpha 24 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
)
common="--batch-size 8 --lr 2e-3 --warmup 10 --schedule-steps 160 --min-lr-ratio 0.1 --max-seq-len 96"
printf '%-8s %8s %14s %10s %14s %10s %7s\n' recipe threads "tailor tok/s" "tailor MB" "PEFT tok/s" "PEFT MB" ratio
for recipe in "${recipes[@]}"; do
  IFS='|' read -r name file lora <<<"$recipe"
  # shellcheck disable=SC2086
  /usr/bin/time -f '%M' -o "$out/rss" target/release/tailor train --model "$model" --data "$file" \
    --out "$out/$name" --steps "$steps" --threads "$threads" $lora $common >"$out/tailor.log" 2>/dev/null
  ours=$(tail -1 "$out/tailor.log" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["median_tokens_per_second"], 1))')
  our_mb=$(( $(cat "$out/rss") / 1024 ))
  theirs="-" their_mb="-" ratio="-"
  if [ -n "${PEFT_PYTHON:-}" ]; then
    # shellcheck disable=SC2086
    "$PEFT_PYTHON" scripts/bench-train-peft.py --gguf "$model" --data "$file" --threads "$threads" \
      --steps "$steps" $lora $common 2>/dev/null | tail -1 >"$out/peft.json"
    theirs=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["median_tokens_per_second"])' <"$out/peft.json")
    their_mb=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["peak_rss_mb"])' <"$out/peft.json")
    ratio=$(python3 -c "print(f'{$ours / $theirs:.2f}')")
  fi
  printf '%-8s %8s %14s %10s %14s %10s %7s\n' "$name" "$threads" "$ours" "$our_mb" "$theirs" "$their_mb" "$ratio"
done
