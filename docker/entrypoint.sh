#!/bin/bash
# `healthcheck` probes /health with the shell alone (no curl in the image);
# anything else is passed to the tailor binary.
set -e
if [ "$1" = "healthcheck" ]; then
  exec 3<>"/dev/tcp/127.0.0.1/${TAILOR_PORT:-8080}" 2>/dev/null || exit 1
  printf 'GET /health HTTP/1.0\r\n\r\n' >&3
  head -n1 <&3 | grep -q ' 200 '
  exit $?
fi
exec tailor "$@"
