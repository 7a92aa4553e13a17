#!/usr/bin/env bash
# The container tests, from a fresh machine with Docker Engine and Compose:
# installs what they need (debootstrap and nginx from Debian's packages, the
# openai SDK), builds the runtime image without a registry (docker/build.sh)
# and runs docker/test.py against it.
#   docker/test.sh [--binary PATH]      (default: a release build)
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PYTHON" -c "import openai, httpx" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "openai>=1.50,<3" "httpx>=0.27,<1"
fi
docker/build.sh --tag tailor:test "$@"
"$PYTHON" docker/test.py tailor:test
