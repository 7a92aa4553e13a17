#!/usr/bin/env bash
# The whole test suite, from a fresh machine: fetches the model and the
# Python packages the tests drive, then runs every Rust test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-model.sh
# llama.cpp's tokenizer test vectors, read in place by tests/cli.rs.
TAILOR_VOCABS="$(scripts/fetch-vocabs.sh)"
export TAILOR_VOCABS
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# The official OpenAI and Anthropic clients, Prometheus' own text-format
# parser, the reference JSON Schema validator, and schemathesis (which drives
# the API from its OpenAPI document).
# Always asked for with their pins: pip leaves versions that satisfy them alone
# and replaces others (a newer major version already installed changes the SDKs' API).
"$PYTHON" -m pip install --quiet --disable-pip-version-check "openai>=1.50,<3" "anthropic>=0.40,<1" \
  "prometheus_client>=0.20,<1" "jsonschema>=4,<5" "selenium>=4.20,<5" "schemathesis>=4.32,<5"
# Headless Chromium and its WebDriver from Debian's packages (selenium drives
# them) for the playground's browser test.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  echo "installing chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
export TAILOR_TEST_PYTHON="$PYTHON"
echo "test.sh: set-up done at ${SECONDS}s"
cargo test --locked --all-targets "$@"
echo "test.sh: cargo test done at ${SECONDS}s"

# Coverage-guided fuzzing of what the server parses (GGUF files, PEFT
# adapters, the tokenizer, templates) from the kept corpus, bounded in time
# (TAILOR_FUZZ_SECONDS per target, default 30; 0 leaves it out).
if [ "${TAILOR_FUZZ_SECONDS:-30}" != 0 ]; then
  fuzz/run.sh "${TAILOR_FUZZ_SECONDS:-30}"
  echo "test.sh: fuzzing done at ${SECONDS}s"
fi

# The container, built and run for real, around the binary the tests just
# built (needs Docker Engine with Compose; TAILOR_SKIP_CONTAINER=1 leaves it out).
if [ "${TAILOR_SKIP_CONTAINER:-0}" = 1 ]; then
  echo "container tests left out (TAILOR_SKIP_CONTAINER=1)"
elif ! docker info >/dev/null 2>&1; then
  echo "container tests need a running Docker Engine (or set TAILOR_SKIP_CONTAINER=1)" >&2
  exit 1
else
  docker/test.sh --binary "${CARGO_TARGET_DIR:-target}/debug/tailor"
  echo "test.sh: container tests done at ${SECONDS}s"
fi
