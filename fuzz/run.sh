#!/usr/bin/env bash
# Runs every fuzz target for a bounded time from the kept corpus
# (fuzz/corpus/, copied so the run does not grow it) and fails on a crash,
# whose input is left in fuzz/artifacts/TARGET/ (turn it into a test).
#   fuzz/run.sh [SECONDS per target, default 60]
# Needs cargo-fuzz (installed here if missing); runs on the stable
# toolchain without a sanitizer (libFuzzer's coverage only).
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
cargo fuzz build --sanitizer none -O
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for target in gguf adapter tokenizer template; do
  cp -r "corpus/$target" "$work/$target"
  echo "fuzzing $target for ${seconds}s"
  cargo fuzz run --sanitizer none -O "$target" "$work/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=20 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)|ERROR|panicked|Test unit written" || true
  if ls "artifacts/$target"/* >/dev/null 2>&1; then
    echo "fuzz target $target found a crash: $(ls artifacts/$target)" >&2
    exit 1
  fi
done
echo "fuzzing: 4 targets, ${seconds}s each, no crash"
