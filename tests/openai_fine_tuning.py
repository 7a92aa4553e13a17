"""OpenAI's fine-tuning API through the official `openai` client: upload the
pirate data, train the pirate recipe as a job, poll it to success, and chat
with `ft:<base>:<suffix>:<job>` on the same server; a malformed upload is a
400 naming its line; queued and running jobs cancel.

usage: openai_fine_tuning.py BASE_URL MODEL_ID TRAIN_DIR ADMIN_KEY
Prints the fine-tuned model id last (the Rust test checks a restart with it).
"""

import json
import sys
import time
from pathlib import Path

import openai

base_url, model, train_dir, key = sys.argv[1:5]
train_dir = Path(train_dir)
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
plain = openai.OpenAI(base_url=base_url, api_key="sk-not-admin", max_retries=0)

# The fine-tuning API needs the admin key.
try:
    plain.files.list()
    raise AssertionError("a plain key listed files")
except (openai.AuthenticationError, openai.PermissionDeniedError):
    pass

data = client.files.create(file=open(train_dir / "pirate.jsonl", "rb"), purpose="fine-tune")
assert data.id.startswith("file-") and data.bytes == (train_dir / "pirate.jsonl").stat().st_size, data
assert client.files.retrieve(data.id).filename == "pirate.jsonl"
assert data.id in [f.id for f in client.files.list()]

bad = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": 3}\n'
try:
    client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    raise AssertionError("a malformed file was accepted")
except openai.BadRequestError as e:
    assert "line 2" in str(e), e

# The shipped pirate adapter's recipe (PEFT's, see README).
recipe = {
    "n_epochs": 1,
    "batch_size": 8,
    "learning_rate_multiplier": 1,
    "n_steps": 40,
    "lora_rank": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "warmup_steps": 10,
    "lr_schedule": "cosine",
    "lr_schedule_steps": 160,
    "min_lr_ratio": 0.1,
    "max_seq_len": 96,
}
job = client.fine_tuning.jobs.create(
    model=model, training_file=data.id, suffix="pirate", seed=7, hyperparameters=recipe
)
assert job.status in ("validating_files", "queued"), job
# A second job queues behind it and is cancelled before it starts.
queued = client.fine_tuning.jobs.create(model=model, training_file=data.id, suffix="never")
assert client.fine_tuning.jobs.cancel(queued.id).status == "cancelled"
try:
    client.fine_tuning.jobs.cancel(queued.id)
    raise AssertionError("a cancelled job was cancelled again")
except openai.BadRequestError:
    pass
try:
    client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=data.id)
    raise AssertionError("another base model was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "model", e.body

deadline = time.time() + 1800
while True:
    job = client.fine_tuning.jobs.retrieve(job.id)
    if job.status in ("succeeded", "failed", "cancelled"):
        break
    assert time.time() < deadline, "the job did not finish in 30 minutes"
    time.sleep(5)
assert job.status == "succeeded", job
assert job.fine_tuned_model == f"ft:{model}:pirate:{job.id}", job
assert job.trained_tokens and job.trained_tokens > 0, job
events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
steps = [e for e in events if e.type == "metrics"]
assert len(steps) == 40, [e.message for e in events]
first, last = steps[-1].data["train_loss"], steps[0].data["train_loss"]
assert last < first / 4, (first, last)
assert queued.id in [j.id for j in client.fine_tuning.jobs.list(limit=10).data]
assert client.fine_tuning.jobs.retrieve(queued.id).status == "cancelled"
models = {m.id: m for m in client.models.list().data}
assert job.fine_tuned_model in models, sorted(models)

# Served at once, no restart: the held-apart prompts in the pirate's style.
prompts = json.loads((train_dir / "eval.json").read_text())["prompts"]
replies = [
    client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": p}],
        max_tokens=32,
        temperature=0,
    )
    .choices[0]
    .message.content
    for p in prompts
]
passed = sum(r.startswith("Arr matey!") for r in replies)
assert passed >= 9, replies

# A running job cancels too, and leaves no model behind.
running = client.fine_tuning.jobs.create(
    model=model, training_file=data.id, suffix="stopped", hyperparameters={"n_steps": 500}
)
while client.fine_tuning.jobs.retrieve(running.id).status != "running":
    assert time.time() < deadline
    time.sleep(0.5)
# After its first step a running job says when it should finish.
while (estimate := client.fine_tuning.jobs.retrieve(running.id).estimated_finish) is None:
    assert time.time() < deadline
    time.sleep(0.2)
assert estimate > time.time() + 10, (estimate, time.time())
assert client.fine_tuning.jobs.cancel(running.id).status == "cancelled"
time.sleep(3)
stopped = client.fine_tuning.jobs.retrieve(running.id)
assert stopped.status == "cancelled" and stopped.fine_tuned_model is None, stopped

print(f"{passed}/10 pirate replies; loss {first:.3f} -> {last:.3f}", file=sys.stderr)
print(job.fine_tuned_model)
