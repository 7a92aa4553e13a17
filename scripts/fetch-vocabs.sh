#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test vectors (models/ggml-vocab-*.gguf with
# their .gguf.inp / .gguf.out) from the llama.cpp tree vendored by the PyPI
# sdist llama-cpp-python==0.3.36, checksum verified, into tailor's cache.
# Idempotent: a complete folder already in place is kept. Prints the folder.
set -euo pipefail

SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
VERSION=0.3.36
CACHE="${TAILOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tailor}"
DEST="$CACHE/llama-vocabs"
VOCABS="llama-spm llama-bpe phi-3 qwen2 deepseek-llm deepseek-coder command-r gpt-2 starcoder falcon mpt refact"

complete() {
  for v in $VOCABS; do
    for ext in gguf gguf.inp gguf.out; do
      [ -f "$DEST/ggml-vocab-$v.$ext" ] || return 1
    done
  done
}

if complete; then
  echo "$DEST"
  exit 0
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# --no-binary for this package only: its build dependencies come as wheels.
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check \
  --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$VERSION" >&2
sdist="$tmp/llama_cpp_python-$VERSION.tar.gz"
if ! echo "$SHA256  $sdist" | sha256sum --check --status; then
  echo "checksum mismatch for $(basename "$sdist") (expected $SHA256)" >&2
  exit 1
fi
members=()
for v in $VOCABS; do
  for ext in gguf gguf.inp gguf.out; do
    members+=("llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-$v.$ext")
  done
done
tar -xzf "$sdist" -C "$tmp" "${members[@]}"
mkdir -p "$DEST"
mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp/models/"ggml-vocab-* "$DEST/"
echo "$DEST"
