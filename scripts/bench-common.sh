# Sourced by the benchmark scripts: waits until the server on $port answers
# /health (model loaded), at most five minutes.
wait_healthy() {
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 0.5
  done
  echo "server did not become healthy" >&2
  return 1
}
