"""Tool calling and structured output with the official OpenAI client against `furnace serve`
on a model with random weights (testdata/tiny-qwen2): whatever the weights, constrained
decoding makes the calls and the JSON valid.

Usage: openai_tools.py BASE_URL MODEL

Asserts each step; prints one JSON object with what was observed.
"""

import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
seen = {}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_weather(args):
    a = json.loads(args)
    assert set(a) == {"city", "unit"} and isinstance(a["city"], str) and len(a["city"]) <= 12 and a["unit"] in ("c", "f"), a


def check_time(args):
    a = json.loads(args)
    assert set(a) == {"zone"} and isinstance(a["zone"], int) and -12 <= a["zone"] <= 14, a


# Required: a valid call, whatever the seed.
for seed in range(3):
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=seed, max_tokens=120,
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None, c
    assert len(c.message.tool_calls) == 1, c.message.tool_calls
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call-"), call
    {"get_weather": check_weather, "get_time": check_time}[call.function.name](call.function.arguments)
seen["required"] = call.function.name

# A named function.
r = client.chat.completions.create(
    model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
    temperature=1.0, seed=5, max_tokens=120,
)
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_time", call
check_time(call.function.arguments)

# Streamed: the call arrives as tool_calls deltas.
chunks = list(
    client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=2, max_tokens=120, stream=True,
    )
)
calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
assert calls and calls[0].function.name == "get_weather", chunks
check_weather(calls[0].function.arguments)
assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]

# Parallel calls allowed: every call returned is complete and valid (a last one cut by
# max_tokens is dropped).
r = client.chat.completions.create(
    model=model, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=1.0, seed=3, max_tokens=160,
)
parallel = r.choices[0].message.tool_calls
assert parallel and r.choices[0].finish_reason == "tool_calls", r.choices[0]
for c in parallel:
    {"get_weather": check_weather, "get_time": check_time}[c.function.name](c.function.arguments)
seen["parallel_calls"] = len(parallel)

# The tool's result goes back in; the conversation renders and runs.
history = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": calls[0].function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"},
]
r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0)
assert r.choices[0].message.tool_calls is None, r

# Structured output: a JSON schema holds on random weights.
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
for seed in range(3):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A person, please."}], temperature=1.0, seed=seed, max_tokens=150,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    v = json.loads(r.choices[0].message.content)
    assert set(v) == {"name", "age", "tags"} and isinstance(v["name"], str) and len(v["name"]) <= 10, v
    assert isinstance(v["age"], int) and 0 <= v["age"] <= 120 and isinstance(v["tags"], list) and len(v["tags"]) <= 3, v
    assert all(isinstance(t, str) and len(t) <= 6 for t in v["tags"]), v
seen["json_schema"] = v

# A bad schema is a 400 naming response_format.
try:
    client.chat.completions.create(
        model=model, messages=ASK, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    )
    raise AssertionError("expected BadRequestError")
except openai.BadRequestError as e:
    assert e.param == "response_format", e
print(json.dumps(seen))
