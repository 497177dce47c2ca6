"""Many clients at once against a running `furnace serve` with the official OpenAI client.

Usage: openai_load.py BASE_URL MODEL STREAMS LIMIT

STREAMS streaming clients run at once; every other one hangs up after its first pieces of
text. Then STREAMS requests at once must all be admitted (the hung-up clients' slots were
freed), and LIMIT + 16 requests at once overflow the server's queue: the overflow gets 429
(the client's RateLimitError, with Retry-After), everything admitted completes. Prints one
JSON object with the counts.
"""

import json
import sys
import threading
import time

import openai

base_url, model, streams, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
PROMPTS = ["Tell me about the sea.", "Count to twenty.", "Name some fruits.", "What is a star?"]
lock = threading.Lock()
out = {"completed": 0, "hung_up": 0, "errors": [], "admitted": 0, "rate_limited": 0, "retry_after": []}


def note(key, value=1):
    with lock:
        if isinstance(out[key], list):
            out[key].append(value)
        else:
            out[key] += value


def stream_client(i):
    try:
        s = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": PROMPTS[i % 4]}], max_tokens=24, temperature=0, stream=True
        )
        pieces, finish = 0, None
        for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if i % 2 == 0 and pieces >= 2:
                s.close()
                note("hung_up")
                return
        assert finish in ("stop", "length"), finish
        note("completed")
    except Exception as e:  # noqa: BLE001 - every failure is reported
        note("errors", f"stream {i}: {type(e).__name__}: {e}")


def run_all(target, n):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


run_all(stream_client, streams)
time.sleep(1.0)


def short_request(i):
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % 4]}], max_tokens=4, temperature=0)
        note("admitted")
    except Exception as e:  # noqa: BLE001
        note("errors", f"after hang-ups {i}: {type(e).__name__}: {e}")


run_all(short_request, streams)
after_hangups = out["admitted"]
out["admitted"] = 0


def overflow_request(i):
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[i % 4]}], max_tokens=32, temperature=0)
        note("admitted")
    except openai.RateLimitError as e:
        note("rate_limited")
        note("retry_after", e.response.headers.get("retry-after"))
    except Exception as e:  # noqa: BLE001
        note("errors", f"overflow {i}: {type(e).__name__}: {e}")


run_all(overflow_request, limit + 16)
out["admitted_after_hangups"] = after_hangups
print(json.dumps(out))
