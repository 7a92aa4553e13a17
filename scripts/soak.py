#!/usr/bin/env python3
"""Soak test: mixed traffic against a running tailor for a while, then checks
that nothing leaked.

    scripts/soak.py --url http://127.0.0.1:8080 --pid $(pgrep -f 'tailor serve') --minutes 10

Clients send, at random: base-model, adapter and preset requests, streaming
and not, chat and completions; a fifth of the streaming clients hang up
mid-stream; some send hostile bodies (malformed JSON, wrong types, huge
numbers, unknown models, wrong content types, oversized bodies). At the end
it prints one JSON summary and exits non-zero if any request got a 5xx, the
server's RSS grew by 10 % or more after warm-up, or running requests and
reserved KV did not return to 0.

Only the standard library: runs wherever Python 3 does.
"""

import argparse
import http.client
import json
import random
import re
import sys
import threading
import time
from urllib.parse import urlparse


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metric(text, name):
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


class Soak:
    def __init__(self, url, model, adapters, presets, key):
        parsed = urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.model, self.adapters, self.presets = model, adapters, presets
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.lock = threading.Lock()
        self.counts = {}
        self.server_errors = []

    def count(self, what):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def connect(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=300)

    def request(self, method, path, body=None, content_type="application/json", stream=False, hang_up=False):
        conn = self.connect()
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = content_type
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        status = response.status
        if stream and status == 200:
            lines = 0
            for line in response:
                lines += 1
                if hang_up and lines >= 3:
                    conn.sock.close()  # the client goes away mid-stream
                    self.count("hung_up")
                    return status
                if line.startswith(b"data: {\"error\""):
                    self.server_errors.append(("stream error", path, line[:300]))
        else:
            text = response.read()
            if status >= 500:
                self.server_errors.append((status, path, text[:300]))
        conn.close()
        self.count(f"{status}")
        return status

    def one(self, rng):
        kind = rng.random()
        model = rng.choice([self.model] + self.adapters + self.presets)
        words = " ".join(rng.choice(["sea", "ship", "sky", "JSON", "list", "why", "how", "cat"]) for _ in range(rng.randint(1, 30)))
        stream = rng.random() < 0.5
        if kind < 0.15:
            self.hostile(rng)
            return
        max_tokens = rng.randint(1, 48)
        if kind < 0.55:
            body = {"model": model, "messages": [{"role": "user", "content": words}], "max_tokens": max_tokens,
                    "stream": stream, "temperature": rng.choice([0, 0.7, 1.0])}
            path = "/v1/chat/completions"
        else:
            body = {"model": model, "prompt": words, "max_tokens": max_tokens, "stream": stream}
            path = "/v1/completions"
        hang_up = stream and rng.random() < 0.2
        self.request("POST", path, json.dumps(body), stream=stream, hang_up=hang_up)

    def hostile(self, rng):
        choice = rng.randrange(8)
        path = rng.choice(["/v1/chat/completions", "/v1/completions", "/tokenize"])
        if choice == 0:
            self.request("POST", path, "{\"model\": ")
        elif choice == 1:
            self.request("POST", path, json.dumps({"model": self.model, "prompt": 7, "messages": "x", "max_tokens": "many"}))
        elif choice == 2:
            self.request("POST", path, json.dumps({"model": "no-such-model", "prompt": "x", "messages": []}))
        elif choice == 3:
            self.request("POST", path, json.dumps({"model": self.model, "prompt": "x", "max_tokens": 10**30, "temperature": -1}))
        elif choice == 4:
            self.request("POST", path, "{\"prompt\": \"x\"}", content_type="text/plain")
        elif choice == 5:
            self.request("POST", path, "[" * 100000)
        elif choice == 6:
            self.request("POST", "/v1/completions", json.dumps({"model": self.model, "prompt": [[1, 2], [10**12]]}))
        else:
            self.request("POST", path, json.dumps({"model": self.model, "prompt": "x" * (9 << 20)}))

    def client(self, seed, until):
        rng = random.Random(seed)
        while time.time() < until:
            try:
                self.one(rng)
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                # A refused oversized body may reset the connection; that is not a 5xx.
                self.count(f"client:{type(e).__name__}")

    def metrics(self):
        conn = self.connect()
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id (for its RSS)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct.Q4_1")
    parser.add_argument("--adapters", default="pirate,shout,json")
    parser.add_argument("--presets", default="")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup-minutes", type=float, default=1)
    args = parser.parse_args()
    soak = Soak(args.url, args.model, [a for a in args.adapters.split(",") if a],
                [p for p in args.presets.split(",") if p], args.api_key)
    start = time.time()
    until = start + args.minutes * 60
    threads = [threading.Thread(target=soak.client, args=(seed, until), daemon=True) for seed in range(args.clients)]
    for t in threads:
        t.start()
    time.sleep(args.warmup_minutes * 60)
    rss_after_warmup = rss_bytes(args.pid)
    rss_samples = []
    while time.time() < until:
        rss_samples.append(rss_bytes(args.pid))
        time.sleep(5)
    for t in threads:
        t.join()
    time.sleep(2)
    text = soak.metrics()
    rss_end = rss_bytes(args.pid)
    summary = {
        "minutes": args.minutes,
        "clients": args.clients,
        "responses": soak.counts,
        "server_errors": len(soak.server_errors),
        "rss_after_warmup_mb": round(rss_after_warmup / 2**20, 1),
        "rss_max_mb": round(max(rss_samples + [rss_end]) / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_pct": round(100 * (rss_end - rss_after_warmup) / rss_after_warmup, 2),
        "running_at_end": metric(text, "vllm:num_requests_running"),
        "waiting_at_end": metric(text, "vllm:num_requests_waiting"),
        "kv_usage_at_end": metric(text, "vllm:kv_cache_usage_perc"),
        "generation_tokens": metric(text, "vllm:generation_tokens_total"),
    }
    print(json.dumps(summary, indent=2))
    for error in soak.server_errors[:10]:
        print("5xx:", error, file=sys.stderr)
    ok = (not soak.server_errors and summary["rss_growth_pct"] < 10 and summary["running_at_end"] == 0
          and summary["kv_usage_at_end"] == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
