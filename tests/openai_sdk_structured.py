"""Structured output and tool calls through the official openai Python SDK.

Usage: python tests/openai_sdk_structured.py BASE_URL MODEL_ID ADAPTER...
For the base model and every adapter: json_schema replies validate against
the schema (jsonschema, the reference validator) greedy and at temperature
1.0 over 20 seeds; json_object replies parse; streamed content equals the
whole reply. Forced tool calls parse with valid arguments, streamed
`tool_calls` deltas assemble into the same call, and a tool result
round-trips into the next turn. Exits non-zero on the first failure.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai

base_url, base, *adapters = sys.argv[1:]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "mood", "tags"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
    },
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Describe a person."}]


def person(model, temperature, seed):
    reply = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=200, temperature=temperature, seed=seed, response_format=FORMAT
    )
    text = reply.choices[0].message.content
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except Exception as e:  # noqa: BLE001 - the message names the model and seed
        raise AssertionError(f"{model} t={temperature} seed={seed}: {e}: {text!r}") from e
    return reply.choices[0].finish_reason


runs = [(m, 0.0, 0) for m in [base, *adapters]] + [(m, 1.0, s) for m in [base, *adapters] for s in range(20)]
with ThreadPoolExecutor(8) as pool:
    reasons = list(pool.map(lambda r: person(*r), runs))
assert all(r == "stop" for r in reasons), reasons
print(f"json_schema: {len(runs)} of {len(runs)} replies valid ({1 + len(adapters)} models, greedy + 20 seeds each)")

for model in [base, *adapters]:
    reply = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(reply.choices[0].message.content), dict), reply
    whole = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=200, temperature=0, response_format=FORMAT
    ).choices[0].message.content
    parts = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=model, messages=ASK, max_tokens=200, temperature=0, response_format=FORMAT, stream=True
        )
        if c.choices
    ]
    assert "".join(parts) == whole, ("".join(parts), whole)
print("json_object parses; streamed json_schema content equals the whole reply")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
]
question = [{"role": "user", "content": "What is the weather in Paris?"}]
forced = {"type": "function", "function": {"name": "get_weather"}}
for choice in ["required", forced]:
    reply = client.chat.completions.create(
        model=base, messages=question, tools=TOOLS, tool_choice=choice, max_tokens=60, temperature=0
    )
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls", reply
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    assert call.function.name == "get_weather" and call.type == "function" and call.id, call

# Streamed: the deltas assemble into the same call.
calls = {}
for chunk in client.chat.completions.create(
    model=base, messages=question, tools=TOOLS, tool_choice=forced, max_tokens=60, temperature=0, stream=True
):
    for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
        entry["name"] += delta.function.name or ""
        entry["arguments"] += delta.function.arguments or ""
assert list(calls) == [0], calls
assert calls[0]["name"] == call.function.name and json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)

# The call and its result go back as the next turn's history.
history = question + [
    reply.choices[0].message.model_dump(exclude_none=True),
    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
]
follow = client.chat.completions.create(model=base, messages=history, tools=TOOLS, max_tokens=40, temperature=0)
assert follow.choices[0].finish_reason in ("stop", "tool_calls", "length"), follow
root = base_url.rsplit("/v1", 1)[0]
prompt = httpx.post(f"{root}/tokenize", json={"model": base, "messages": history, "tools": TOOLS}).json()
assert prompt["count"] == follow.usage.prompt_tokens, (prompt["count"], follow.usage)
text = httpx.post(f"{root}/detokenize", json={"model": base, "tokens": prompt["tokens"]}).json()["prompt"]
assert "18 degrees and sunny" in text and "get_weather" in text, text
print("forced tool calls valid, streamed deltas assemble, a tool result round-trips")
