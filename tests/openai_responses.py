"""Drives tailor's Responses API with the official openai Python SDK.

Usage: python tests/openai_responses.py BASE_URL MODEL_ID ADAPTER PRESET
Each reply must equal chat completions' for the same conversation at
temperature 0: one generation path, two wire formats.
"""

import json
import sys

import httpx
import jsonschema
import openai

base_url, base, adapter, preset = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused")
QUESTION = "What is the capital of France?"


def chat(model, messages, max_tokens):
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0], reply.usage


# Plain input, with instructions, with a message list: text and usage equal chat's.
cases = [
    (dict(input=QUESTION), [{"role": "user", "content": QUESTION}]),
    (
        dict(input=QUESTION, instructions="Answer in one short sentence."),
        [{"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": QUESTION}],
    ),
    (
        dict(
            input=[
                {"role": "user", "content": [{"type": "input_text", "text": "Name a fruit."}]},
                {"role": "assistant", "content": "An apple."},
                {"type": "message", "role": "user", "content": "Name another one."},
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
        response = client.responses.create(model=model, max_output_tokens=32, temperature=0, **kwargs)
        choice, usage = chat(model, messages, 32)
        assert response.object == "response" and response.id.startswith("resp_"), response
        assert response.model == model, response.model
        assert response.output_text == choice.message.content, (model, response.output_text, choice.message.content)
        message = response.output[0]
        assert message.type == "message" and message.role == "assistant", message
        assert message.content[0].type == "output_text", message
        expected = "incomplete" if choice.finish_reason == "length" else "completed"
        assert response.status == expected, (response.status, choice.finish_reason)
        if expected == "incomplete":
            assert response.incomplete_details.reason == "max_output_tokens", response.incomplete_details
        assert response.usage.input_tokens == usage.prompt_tokens, (response.usage, usage)
        assert response.usage.output_tokens == usage.completion_tokens, (response.usage, usage)
        assert response.usage.total_tokens == usage.total_tokens, (response.usage, usage)

pirate = client.responses.create(model=adapter, input=QUESTION, max_output_tokens=24, temperature=0)
assert pirate.output_text.startswith("Arr matey!"), pirate.output_text
print("responses: base, adapter and preset equal chat; pirate says", repr(pirate.output_text))

# Streaming: the event types in order, numbered, adding up to the same text.
events = list(client.responses.create(model=adapter, input=QUESTION, max_output_tokens=24, temperature=0, stream=True))
kinds = [e.type for e in events]
deltas = [e for e in events if e.type == "response.output_text.delta"]
assert deltas, kinds
head = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
tail = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
assert kinds[:4] == head and kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas), kinds
assert kinds[4 + len(deltas) : -1] == tail and kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert [e.sequence_number for e in events] == list(range(len(events))), [e.sequence_number for e in events]
assert all(e.output_index == 0 for e in deltas)
assert "".join(e.delta for e in deltas) == pirate.output_text
assert events[-1].response.output_text == pirate.output_text and events[-1].response.usage.output_tokens > 0
# The SDK's stream helper (it tracks items by output_index).
with client.responses.stream(model=adapter, input=QUESTION, max_output_tokens=24, temperature=0) as stream:
    streamed = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert streamed == pirate.output_text and final.output_text == pirate.output_text, (streamed, final.output_text)
print("responses: stream events in order,", len(events), "events")

# Structured output through text.format.
schema = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
shaped = client.responses.create(
    model=base,
    input="Name a city and its country as JSON.",
    text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
    max_output_tokens=60,
    temperature=0,
)
jsonschema.validate(json.loads(shaped.output_text), schema)

# Function tools: a forced call comes back as a function_call item; its
# output goes back as the next input.
tools = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
]
called = client.responses.create(
    model=base, input="What is the weather in Paris?", tools=tools, tool_choice="required", max_output_tokens=60, temperature=0
)
calls = [item for item in called.output if item.type == "function_call"]
assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id, called.output
jsonschema.validate(json.loads(calls[0].arguments), tools[0]["parameters"])
streamed_kinds = [
    e.type
    for e in client.responses.create(
        model=base, input="What is the weather in Paris?", tools=tools, tool_choice="required", max_output_tokens=60, temperature=0, stream=True
    )
]
assert "response.function_call_arguments.done" in streamed_kinds and streamed_kinds[-1] == "response.completed", streamed_kinds
follow = client.responses.create(
    model=base,
    input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 degrees and sunny"},
    ],
    tools=tools,
    max_output_tokens=30,
    temperature=0,
)
assert follow.status in ("completed", "incomplete") and follow.output, follow
print("responses: json_schema output valid, a function call round-trips")

# Refusals: OpenAI's error envelope with the field named, never a 5xx.
for kwargs, param in [
    (dict(previous_response_id="resp_123"), "previous_response_id"),
    (dict(store=True), "store"),
    (dict(temperature=5), "temperature"),
    (dict(max_output_tokens=0), "max_output_tokens"),
]:
    try:
        client.responses.create(model=base, input="Hi", **kwargs)
        raise AssertionError(f"{kwargs} accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == param, (kwargs, e.body)
try:
    client.responses.create(model="no-such-model", input="Hi")
    raise AssertionError("unknown model accepted")
except openai.NotFoundError:
    pass
for body in [{"model": base, "input": [{"type": "input_image"}]}, {"model": base, "input": 3}, {"input": "Hi"}, [1]]:
    reply = httpx.post(f"{base_url}/responses", json=body)
    assert reply.status_code == 400 and "error" in reply.json(), (body, reply.status_code, reply.text)
print("responses: bad input refused with 400s")
