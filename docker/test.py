"""The container, run for real: health, the openai SDK on base / adapter /
preset, mounted folders (a template edit reloads, a new adapter loads),
non-root and a read-only root filesystem, `docker stop` draining a stream,
the compose file's data volume keeping fine-tuning files, jobs and adapters
across `down` and `up`, and two replicas behind nginx losing one mid-load
without a failed request.

Usage: python docker/test.py IMAGE   (docker/test.sh builds IMAGE and runs this)
Needs docker, docker-compose, nginx, and the openai and httpx packages.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import openai

IMAGE = sys.argv[1]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "SmolLM2-135M-Instruct.Q4_1"
PREFIX = f"tailor-test-{os.getpid()}"


def sh(*args, check=True):
    result = subprocess.run(args, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}{result.stdout}")
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(container, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = sh("docker", "inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        if status == "healthy":
            return
        time.sleep(0.5)
    logs = sh("docker", "logs", container, check=False)
    raise AssertionError(f"{container} not healthy after {timeout}s: {logs.stdout}{logs.stderr}")


def run_container(name, port, folders, env=()):
    args = ["docker", "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080", "--read-only", "--tmpfs", "/tmp"]
    args += ["--health-interval", "1s", "--health-start-period", "60s"]
    for host, inside in folders:
        args += ["-v", f"{host}:{inside}:ro"]
    for pair in env:
        args += ["-e", pair]
    sh(*args, IMAGE)
    wait_healthy(name)


def first_reply(client, model, question="What is the capital of France?", max_tokens=24):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content


def single_container(work):
    name = f"{PREFIX}-one"
    port = free_port()
    folders = [(f"{work}/{d}", f"/srv/tailor/{d}") for d in ("templates", "adapters", "presets")]
    run_container(name, port, folders, env=["TAILOR_ENABLE_LORA_LOADING=true", "TAILOR_THREADS=2"])
    try:
        url = f"http://127.0.0.1:{port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        # The SDK on the base, an adapter and a preset, through the published port.
        base = first_reply(client, BASE)
        assert base and not base.startswith("Arr matey!"), base
        assert first_reply(client, "pirate").startswith("Arr matey!")
        assert first_reply(client, "pirate-chat").startswith("Arr matey!")
        ids = {m.id for m in client.models.list()}
        assert {BASE, "pirate", "shout", "json", "pirate-chat"} <= ids, ids
        print("container: healthy; base, adapter and preset answer through the openai SDK; mounted adapters listed")

        # Non-root, read-only root filesystem.
        uid = sh("docker", "exec", name, "id", "-u").stdout.strip()
        assert uid != "0", uid
        assert sh("docker", "inspect", "-f", "{{.HostConfig.ReadonlyRootfs}}", name).stdout.strip() == "true"
        write = sh("docker", "exec", name, "sh", "-c", "echo x > /srv/tailor/x", check=False)
        assert write.returncode != 0 and "Read-only" in write.stderr, write
        print(f"container: runs as uid {uid}, root filesystem read-only")

        # A template edited on the host changes the next rendering.
        render = lambda: httpx.post(
            f"{url}/v1/templates/summarize/render", json={"template_vars": {"text": "Cats sleep a lot.", "sentences": 1}}
        ).json()
        before = render()
        assert "Cats sleep a lot." in before["prompt"], before
        path = f"{work}/templates/summarize.jinja"
        with open(path) as f:
            source = f.read()
        marker = "Edited on the host."
        assert "{{ text }}" in source, source
        with open(path, "w") as f:
            f.write(source.replace("{{ text }}", marker + " {{ text }}"))
        deadline = time.time() + 15
        while marker not in render()["prompt"]:
            assert time.time() < deadline, f"the edit did not reach the container: {render()}"
            time.sleep(0.3)
        print("container: a template edited on the host renders anew")

        # An adapter folder added on the host loads at run time.
        shutil.copytree(f"{work}/adapters/shout", f"{work}/adapters/shout-copy")
        loaded = httpx.post(
            f"{url}/v1/load_lora_adapter", json={"lora_name": "shout-copy", "lora_path": "/srv/tailor/adapters/shout-copy"}
        )
        assert loaded.status_code == 200, loaded.text
        assert first_reply(client, "shout-copy") == first_reply(client, "shout")
        print("container: an adapter added to the mounted folder loads at run time")

        # docker stop during a 200-token stream: the stream finishes, the check fails while draining, exit 0.
        chunks, done = [], threading.Event()

        def stream():
            body = {
                "model": BASE,
                "prompt": "Once upon a time",
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
            done.set()

        reader = threading.Thread(target=stream)
        reader.start()
        while len(chunks) < 10:
            assert reader.is_alive(), chunks
            time.sleep(0.02)
        stopper = threading.Thread(target=sh, args=("docker", "stop", "-t", "35", name))
        stopper.start()
        time.sleep(0.5)
        health = sh("docker", "exec", name, "tailor-entrypoint", "healthcheck", check=False)
        assert health.returncode != 0, "the health check passes while draining"
        reader.join(60)
        stopper.join(60)
        assert chunks[-1] == "[DONE]", chunks[-3:]
        usage = json.loads(chunks[-2])["usage"]
        text = "".join(c["choices"][0]["text"] for c in map(json.loads, chunks[:-1]) if c["choices"])
        assert usage["completion_tokens"] == 200 and text, (usage, text[:80])
        code = sh("docker", "inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", code
        print("container: docker stop mid-stream: 200 tokens and [DONE], unhealthy while draining, exit 0")
    finally:
        sh("docker", "rm", "-f", name, check=False)


def compose_files_parse():
    env = dict(os.environ, TAILOR_IMAGE=IMAGE)
    for name in ("compose.yaml", "compose.replicas.yaml"):
        result = subprocess.run(["docker-compose", "-f", f"{ROOT}/docker/{name}", "config", "-q"], env=env, capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)


def compose_keeps_fine_tuning_across_down_and_up():
    """The shipped compose file: a file uploaded and a short job trained in
    the container are still there, and the adapter served, after down + up."""
    port = free_port()
    env = dict(os.environ, TAILOR_IMAGE=IMAGE, TAILOR_PUBLISH=f"127.0.0.1:{port}")
    compose = ["docker-compose", "-f", f"{ROOT}/docker/compose.yaml", "-p", PREFIX.replace("-", "") + "data"]

    def up():
        subprocess.run(compose + ["up", "-d"], env=env, check=True, capture_output=True)
        containers = sh(*compose, "ps", "-q").stdout.split()
        assert len(containers) == 1, containers
        wait_healthy(containers[0])

    up()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        with open(f"{ROOT}/tests/fixtures/smollm2/train/pirate.jsonl", "rb") as f:
            data = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model=BASE, training_file=data.id, suffix="box",
            hyperparameters={"n_steps": 2, "batch_size": 2, "max_seq_len": 64, "lora_rank": 4},
        )
        deadline = time.time() + 300
        while job.status not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, job
            time.sleep(1)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job
        subprocess.run(compose + ["down", "-t", "5"], env=env, check=True, capture_output=True)
        up()
        assert client.files.retrieve(data.id).filename == "pirate.jsonl"
        kept = client.fine_tuning.jobs.retrieve(job.id)
        assert kept.status == "succeeded" and kept.fine_tuned_model == job.fine_tuned_model, kept
        assert first_reply(client, kept.fine_tuned_model, max_tokens=4) is not None
        print(f"compose: a file and a job trained in the container ({job.fine_tuned_model}) kept across down + up")
    finally:
        subprocess.run(compose + ["down", "-v", "-t", "5"], env=env, capture_output=True)


def replicas_behind_nginx():
    a, b, front = free_port(), free_port(), free_port()
    env = dict(os.environ, TAILOR_IMAGE=IMAGE, TAILOR_A_PORT=str(a), TAILOR_B_PORT=str(b))
    compose = ["docker-compose", "-f", f"{ROOT}/docker/compose.replicas.yaml", "-p", PREFIX.replace("-", "")]
    conf_dir = tempfile.mkdtemp()
    with open(f"{ROOT}/docker/nginx.conf") as f:
        conf = f.read().replace("127.0.0.1:8081", f"127.0.0.1:{a}").replace("127.0.0.1:8082", f"127.0.0.1:{b}")
        conf = conf.replace("listen 127.0.0.1:8080", f"listen 127.0.0.1:{front}").replace("/tmp/tailor-nginx", f"{conf_dir}/nginx")
    with open(f"{conf_dir}/nginx.conf", "w") as f:
        f.write(conf)
    subprocess.run(compose + ["up", "-d"], env=env, check=True, capture_output=True)
    nginx = None
    try:
        containers = sh(*compose, "ps", "-q").stdout.split()
        assert len(containers) == 2, containers
        for c in containers:
            wait_healthy(c)
        nginx = subprocess.Popen(["nginx", "-p", conf_dir, "-c", f"{conf_dir}/nginx.conf"], stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{front}"
        deadline = time.time() + 10
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "nginx did not come up"
            time.sleep(0.2)

        # Four streams in a loop, each request with its own prompt; one replica stopped mid-run.
        results, stop = [], threading.Event()

        def worker(w):
            i = 0
            while not stop.is_set():
                body = {
                    "model": "pirate",
                    "messages": [{"role": "user", "content": f"Worker {w}, question {i}: name a sea."}],
                    "max_tokens": 24,
                    "stream": True,
                }
                try:
                    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                    ok = r.status_code == 200 and lines and lines[-1] == "data: [DONE]"
                    results.append((ok, r.status_code, lines[-1:] if lines else []))
                except httpx.HTTPError as e:
                    results.append((False, 0, str(e)))
                i += 1

        workers = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in workers:
            t.start()
        time.sleep(6)
        before = len(results)
        sh(*compose, "stop", "-t", "35", "tailor-a")
        time.sleep(6)
        stop.set()
        for t in workers:
            t.join(90)
        failed = [r for r in results if not r[0]]
        assert before > 0 and len(results) > before, (before, len(results))
        assert not failed, failed[:5]
        print(f"replicas: {len(results)} streamed requests through nginx, one replica stopped after {before}: 0 failed")
    finally:
        if nginx:
            nginx.terminate()
            nginx.wait(10)
        subprocess.run(compose + ["down", "-t", "5"], env=env, capture_output=True)
        shutil.rmtree(conf_dir, ignore_errors=True)


with tempfile.TemporaryDirectory() as work:
    for folder in ("templates", "adapters", "presets"):
        shutil.copytree(f"{ROOT}/{folder}", f"{work}/{folder}")
    # The container's user reads what the host mounts.
    for dirpath, dirnames, filenames in os.walk(work):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    single_container(work)
compose_files_parse()
compose_keeps_fine_tuning_across_down_and_up()
replicas_behind_nginx()
print("container tests: ok")
