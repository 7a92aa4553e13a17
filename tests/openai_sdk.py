"""Drives a running tailor server with the official openai Python SDK.

Usage: python tests/openai_sdk.py BASE_URL MODEL_ID
Exits non-zero (with the failing assertion) if the server does not behave
like an OpenAI endpoint for this client.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")

# Models
ids = [m.id for m in client.models.list()]
assert model in ids, ids

# Chat, non-streaming
messages = [{"role": "user", "content": "What is the capital of France?"}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
reply = chat.choices[0].message.content
assert chat.choices[0].message.role == "assistant"
assert reply, chat
assert chat.usage.completion_tokens > 0 and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# Chat, streaming (with usage), equals the non-streamed reply
parts, usage = [], None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
):
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            parts.append(choice.delta.content)
assert "".join(parts) == reply, ("".join(parts), reply)
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Completions, non-streaming and streaming
completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
text = completion.choices[0].text
assert text.startswith(" Paris"), text
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
    if c.choices
)
assert streamed == text, (streamed, text)

# Errors surface as the SDK's typed exceptions
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature 5 accepted")
except openai.BadRequestError as e:
    assert "temperature" in str(e)

print("openai sdk: ok", repr(reply))
