"""The official OpenAI Python client against a running `furnace serve`.

Usage: openai_client.py BASE_URL BASE_MODEL ADAPTER_MODEL EMBEDDING_MODEL ADAPTER_DIR

Each check asserts with a message; on success one JSON object with what was observed is
printed (the Rust test reads it). Run by `serve::the_official_openai_client_*`.
"""

import base64
import json
import struct
import sys
import threading
import urllib.error
import urllib.request

import openai

base_url, base, adapter, embedder, adapter_dir = sys.argv[1:6]
client = openai.OpenAI(base_url=base_url, api_key="unused-on-loopback", max_retries=0, timeout=300)
seen = {}

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Models: the base, the adapter, the embedding model.
ids = [m.id for m in client.models.list().data]
assert base in ids and adapter in ids and embedder in ids, ids
seen["models"] = ids

# Chat, whole: greedy, with usage.
r = client.chat.completions.create(model=base, messages=QUESTION, max_tokens=24, temperature=0)
whole = r.choices[0].message.content
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant", r
assert "Paris" in whole, whole
assert r.choices[0].finish_reason in ("stop", "length"), r.choices[0].finish_reason
assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens > 0, r.usage
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
seen["chat"] = whole
seen["chat_usage"] = [r.usage.prompt_tokens, r.usage.completion_tokens]

# A JSON schema on the real model, greedy: valid JSON with the fields asked for.
js = client.chat.completions.create(
    model=base, messages=[{"role": "user", "content": "Give the capital of France as JSON."}], temperature=0, max_tokens=60,
    response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}}, "required": ["country", "capital"]}}},
)
parsed = json.loads(js.choices[0].message.content)
assert set(parsed) == {"country", "capital"} and all(isinstance(v, str) for v in parsed.values()), parsed
seen["json"] = parsed

# Chat, streamed with usage: the same text, usage in a last chunk without choices.
chunks = list(
    client.chat.completions.create(
        model=base, messages=QUESTION, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
)
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == whole, (streamed, whole)
assert chunks[0].choices[0].delta.role == "assistant"
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [r.choices[0].finish_reason], finishes
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens, chunks[-1]
seen["stream_chunks"] = len(chunks)

# Text completions, whole and streamed.
t = client.completions.create(model=base, prompt="The capital of France is", max_tokens=8, temperature=0)
assert t.object == "text_completion" and t.choices[0].text, t
ts = "".join(c.choices[0].text for c in client.completions.create(model=base, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
assert ts == t.choices[0].text, (ts, t.choices[0].text)
seen["completion"] = t.choices[0].text

# n > 1 with a seed: n choices, and the same seed gives the same choices.
def sampled():
    r = client.chat.completions.create(model=base, messages=QUESTION, max_tokens=12, temperature=1.0, n=3, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2], r.choices
    return [c.message.content for c in r.choices]

first, second = sampled(), sampled()
assert first == second, (first, second)
seen["n3"] = first

# A stop string cuts the text before it.
s = client.chat.completions.create(model=base, messages=QUESTION, max_tokens=24, temperature=0, stop=["Paris"])
assert "Paris" not in s.choices[0].message.content and s.choices[0].finish_reason == "stop", s.choices[0]

# Log-probabilities: greedy picks the most likely token; the tokens spell the text.
lp = client.chat.completions.create(model=base, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content
assert content and "".join(t.token for t in content) == lp.choices[0].message.content, content
for t in content:
    assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token, t
    assert t.logprob <= 0 and abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6, t
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob, t
streamed_lp = [
    t.token
    for c in client.chat.completions.create(model=base, messages=QUESTION, max_tokens=12, temperature=0, logprobs=True, stream=True)
    if c.choices and c.choices[0].logprobs
    for t in c.choices[0].logprobs.content
]
assert streamed_lp == [t.token for t in content], (streamed_lp, content)
tl = client.completions.create(model=base, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
assert len(tl.choices[0].logprobs.tokens) == len(tl.choices[0].logprobs.token_logprobs) == len(tl.choices[0].logprobs.top_logprobs)
assert "".join(tl.choices[0].logprobs.tokens) == tl.choices[0].text, tl.choices[0]
seen["logprobs"] = [round(t.logprob, 4) for t in content]

# Penalties are applied: a strong frequency penalty changes a repetitive greedy answer.
rep = [{"role": "user", "content": "Repeat after me ten times: ha ha ha ha ha ha ha ha ha ha"}]
plain = client.chat.completions.create(model=base, messages=rep, max_tokens=24, temperature=0).choices[0].message.content
penalised = client.chat.completions.create(model=base, messages=rep, max_tokens=24, temperature=0, frequency_penalty=2.0, presence_penalty=1.0).choices[0].message.content
assert plain != penalised, (plain, penalised)
seen["penalty"] = [plain, penalised]

# Embeddings: the client's default (base64) and floats agree; unit vectors.
e = client.embeddings.create(model=embedder, input=["furnace serves models", "a second text"])
f = client.embeddings.create(model=embedder, input=["furnace serves models", "a second text"], encoding_format="float")
assert len(e.data) == 2 and len(e.data[0].embedding) == 384, len(e.data[0].embedding)
for a, b in zip(e.data, f.data):
    assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
    norm = sum(x * x for x in a.embedding) ** 0.5
    assert abs(norm - 1.0) < 1e-3, norm
assert e.usage.prompt_tokens > 0
seen["embedding_dim"] = len(e.data[0].embedding)

# Mixed adapters in one batch: each request gets the tokens it gets alone.
def chat(model, text):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], max_tokens=16, temperature=0)
    return r.choices[0].message.content

prompts = ["Name a color.", "Count to five.", "What is 2+2?", "Say hello."]
alone = {(m, p): chat(m, p) for m in (base, adapter) for p in prompts}
together = {}
def worker(m, p):
    together[(m, p)] = chat(m, p)
threads = [threading.Thread(target=worker, args=(m, p)) for m in (base, adapter) for p in prompts]
for th in threads:
    th.start()
for th in threads:
    th.join()
assert together == alone, {str(k): (alone[k], together.get(k)) for k in alone if alone[k] != together.get(k)}
seen["adapter_differs"] = any(alone[(base, p)] != alone[(adapter, p)] for p in prompts)

# Errors surface as the client's exception types.
def raises(kind, f):
    try:
        f()
    except kind as err:
        return err
    raise AssertionError(f"expected {kind.__name__}")

err = raises(openai.NotFoundError, lambda: client.chat.completions.create(model="no-such-model", messages=QUESTION))
assert err.status_code == 404 and err.code == "model_not_found", err
err = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=base, messages=QUESTION, extra_body={"mirostat": 2}))
assert "mirostat" in err.message and err.param == "mirostat", err
err = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=base, messages=[{"role": "user", "content": "word " * 9000}]))
assert err.code == "context_length_exceeded", err
err = raises(openai.BadRequestError, lambda: client.chat.completions.create(model=base, messages=QUESTION, temperature=7))
assert err.param == "temperature", err
err = raises(openai.NotFoundError, lambda: client.embeddings.create(model=base, input="x"))
seen["errors"] = "ok"

# Adapters loaded and unloaded at run time (vLLM's routes).
def post(path, body):
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)

status, body = post("/load_lora_adapter", {"lora_name": "late", "lora_path": adapter_dir})
assert status == 200, body
assert "late" in [m.id for m in client.models.list().data]
assert chat("late", prompts[0]) == alone[(adapter, prompts[0])]
status, body = post("/unload_lora_adapter", {"lora_name": "late"})
assert status == 200, body
raises(openai.NotFoundError, lambda: chat("late", prompts[0]))
status, body = post("/load_lora_adapter", {"lora_name": "bad", "lora_path": "/nonexistent/adapter"})
assert status == 400 and body["error"]["param"] == "lora_path", body
seen["runtime_adapters"] = "ok"

# Feedback: rate the first chat; an unknown id is a 404.
status, body = post("/feedback", {"id": r.id, "rating": 5, "comment": "right answer"})
assert status == 200 and body["rating"] == 5, body
status, body = post("/feedback", {"id": "chatcmpl-unknown", "rating": 1})
assert status == 404, body
seen["rated"] = r.id

print(json.dumps(seen))
