"""Drives tailor's Messages API with the official anthropic Python SDK.

Usage: python tests/anthropic_messages.py ROOT_URL MODEL_ID ADAPTER PRESET API_KEY
The server runs with --api-key API_KEY: the SDK sends it as `x-api-key`.
Each reply must equal chat completions' for the same conversation at
temperature 0: one generation path, two wire formats.
"""

import sys

import anthropic
import httpx
import openai

root, base, adapter, preset, key = sys.argv[1:6]
client = anthropic.Anthropic(base_url=root, api_key=key, max_retries=0)
chat_client = openai.OpenAI(base_url=f"{root}/v1", api_key=key)
QUESTION = "What is the capital of France?"


def chat(model, messages, max_tokens, stop=None):
    reply = chat_client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stop=stop
    )
    return reply.choices[0], reply.usage


def text_of(message):
    return "".join(block.text for block in message.content if block.type == "text")


# Plain, with a system prompt, multi-turn: text, stop_reason and usage equal chat's.
cases = [
    (dict(messages=[{"role": "user", "content": QUESTION}]), [{"role": "user", "content": QUESTION}]),
    (
        dict(system="Answer in one short sentence.", messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]),
        [{"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": QUESTION}],
    ),
    (
        dict(
            messages=[
                {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "An apple."},
                {"role": "user", "content": "Name another one."},
            ]
        ),
        [
            {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "An apple."},
            {"role": "user", "content": "Name another one."},
        ],
    ),
]
for model in [base, adapter, preset]:
    for kwargs, messages in cases:
        message = client.messages.create(model=model, max_tokens=32, temperature=0, **kwargs)
        choice, usage = chat(model, messages, 32)
        assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_"), message
        assert message.model == model, message.model
        assert text_of(message) == choice.message.content, (model, text_of(message), choice.message.content)
        expected = {"length": "max_tokens", "stop": "end_turn"}[choice.finish_reason]
        assert message.stop_reason == expected and message.stop_sequence is None, (message.stop_reason, choice)
        prompt = message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)
        assert prompt == usage.prompt_tokens, (message.usage, usage)
        assert message.usage.output_tokens == usage.completion_tokens, (message.usage, usage)

pirate = client.messages.create(model=adapter, max_tokens=24, temperature=0, messages=[{"role": "user", "content": QUESTION}])
# count_tokens: the prompt as the model sees it, the preset's system prompt included.
for model in [base, adapter, preset]:
    counted = client.messages.count_tokens(model=model, system="Be brief.", messages=[{"role": "user", "content": QUESTION}])
    _, usage = chat(model, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}], 1)
    assert counted.input_tokens == usage.prompt_tokens, (model, counted, usage)
assert text_of(pirate).startswith("Arr matey!"), text_of(pirate)
print("messages: base, adapter and preset equal chat; pirate says", repr(text_of(pirate)))

# stop_reason: a matched stop sequence is named, not reported as end_turn.
words = text_of(pirate).split()
stop = words[len(words) // 2]
stopped = client.messages.create(
    model=adapter, max_tokens=24, temperature=0, stop_sequences=["\u2603", stop], messages=[{"role": "user", "content": QUESTION}]
)
choice, _ = chat(adapter, [{"role": "user", "content": QUESTION}], 24, stop=["\u2603", stop])
assert getattr(choice, "stop_reason", None) == stop, choice  # vLLM's field on chat
assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop, (stopped.stop_reason, stopped.stop_sequence, stop)
assert text_of(stopped) == choice.message.content and stop not in text_of(stopped), (text_of(stopped), choice.message.content)
short = client.messages.create(model=base, max_tokens=3, temperature=0, messages=[{"role": "user", "content": QUESTION}])
assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3, short

# Streaming: the SDK's helper and the raw events, in Anthropic's order.
with client.messages.stream(model=adapter, max_tokens=24, temperature=0, messages=[{"role": "user", "content": QUESTION}]) as stream:
    streamed = "".join(stream.text_stream)
    final = stream.get_final_message()
assert streamed == text_of(pirate) and text_of(final) == text_of(pirate), (streamed, text_of(final))
assert final.stop_reason == pirate.stop_reason and final.usage.output_tokens == pirate.usage.output_tokens, final
raw = list(
    client.messages.create(
        model=adapter, max_tokens=24, temperature=0, stop_sequences=[stop], messages=[{"role": "user", "content": QUESTION}], stream=True
    )
)
kinds = [e.type for e in raw]
n = kinds.count("content_block_delta")
assert n > 0 and kinds == ["message_start", "content_block_start"] + ["content_block_delta"] * n + [
    "content_block_stop",
    "message_delta",
    "message_stop",
], kinds
assert raw[-2].delta.stop_reason == "stop_sequence" and raw[-2].delta.stop_sequence == stop, raw[-2]
assert "".join(e.delta.text for e in raw if e.type == "content_block_delta") == text_of(stopped)
print("messages: stop_reason exact, streams in order,", len(raw), "events")

# A final assistant turn is continued (prefill), as Anthropic does.
prefilled = client.messages.create(
    model=base,
    max_tokens=8,
    temperature=0,
    messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The capital of France is"}],
)
assert text_of(prefilled).strip().startswith("Paris"), text_of(prefilled)

# Tools: a forced tool_use block with its input object.
tools = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]
used = client.messages.create(
    model=base,
    max_tokens=60,
    temperature=0,
    tools=tools,
    tool_choice={"type": "tool", "name": "get_weather"},
    messages=[{"role": "user", "content": "What is the weather in Paris?"}],
)
uses = [b for b in used.content if b.type == "tool_use"]
assert used.stop_reason == "tool_use" and len(uses) == 1 and isinstance(uses[0].input.get("city"), str), used
answer = client.messages.create(
    model=base,
    max_tokens=30,
    temperature=0,
    tools=tools,
    messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": uses[0].id, "name": "get_weather", "input": uses[0].input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 degrees and sunny"}]},
    ],
)
assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use"), answer
print("messages: tool_use forced, a tool_result round-trips")

# Errors in Anthropic's shape, never a 5xx.
try:
    client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    raise AssertionError("unknown model accepted")
except anthropic.NotFoundError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body
try:
    anthropic.Anthropic(base_url=root, api_key="wrong", max_retries=0).messages.create(
        model=base, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
    )
    raise AssertionError("a wrong key accepted")
except anthropic.AuthenticationError as e:
    assert e.body["error"]["type"] == "authentication_error", e.body
headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
for body in [
    {"model": base, "messages": [{"role": "user", "content": "Hi"}]},
    {"model": base, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"model": base, "max_tokens": 5, "messages": "Hi"},
    {"model": base, "max_tokens": 5, "temperature": 7, "messages": [{"role": "user", "content": "Hi"}]},
    [],
]:
    reply = httpx.post(f"{root}/v1/messages", json=body, headers=headers)
    error = reply.json()
    assert reply.status_code == 400 and error["type"] == "error", (body, reply.status_code, reply.text)
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"], error
missing = httpx.post(f"{root}/v1/messages", json={"model": base, "messages": [{"role": "user", "content": "Hi"}]}, headers=headers)
assert "max_tokens" in missing.json()["error"]["message"], missing.text
print("messages: errors in Anthropic's shape")
