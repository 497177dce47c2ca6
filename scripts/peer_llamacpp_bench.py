#!/usr/bin/env python3
"""Peer baseline for `furnace bench generate`: llama.cpp (through llama-cpp-python) on the
same GGUF file, measuring the same workload.

  prefill   one forward of a 256-token prompt (xorshift ids, seed 42) into an empty cache,
            after an untimed 32-token warm-up; tokens/s = prompt tokens / time
  decode    batch 1: a 16-token prompt (xorshift ids, seed 7) evaluated and its first new
            token taken untimed, then 127 more greedy tokens (arg-max of the logits), each
            one forward of one token; tokens/s = tokens after the first / time

Both are repeated --repeat times and the median is printed; the ids are the ones
`furnace bench generate` feeds (its xorshift_ids over the model's vocabulary). llama.cpp runs
with its defaults otherwise (f16 KV cache, n_batch 512), on --threads threads.

usage: peer_llamacpp_bench.py MODEL.gguf [--threads 2] [--prompt-len 256] [--new-tokens 128]
                              [--decode-prompt-len 16] [--repeat 3]
Prints one line per measurement starting with RESULT. Needs target/llamacpp-venv
(scripts/llamacpp-venv.sh).
"""

import argparse
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama


def xorshift_ids(n: int, vocab: int, seed: int) -> list[int]:
    """Deterministic pseudo-random ids (xorshift64), as furnace's bench and peer_torch.py."""
    s, out, m = seed, [], (1 << 64) - 1
    for _ in range(n):
        s ^= (s << 13) & m
        s ^= s >> 7
        s ^= (s << 17) & m
        out.append(s % vocab)
    return out


def last_logits(llm: Llama, n_vocab: int) -> np.ndarray:
    # llama-cpp-python keeps only the last position's logits when logits_all is off.
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-prompt-len", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    t0 = time.perf_counter()
    n_ctx = max(a.prompt_len, a.decode_prompt_len + a.new_tokens) + 16
    llm = Llama(model_path=a.model, n_ctx=n_ctx, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    prompt = xorshift_ids(a.prompt_len, n_vocab, 42)
    repeat = max(1, a.repeat)

    # Warm-up: first touch of the weights.
    llm.reset()
    llm.eval(prompt[:32])

    prefill = []
    for _ in range(repeat):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill.append(a.prompt_len / (time.perf_counter() - t))

    decode = []
    dprompt = xorshift_ids(a.decode_prompt_len, n_vocab, 7)
    for _ in range(repeat):
        llm.reset()
        llm.eval(dprompt)
        tok = int(np.argmax(last_logits(llm, n_vocab)))
        t = time.perf_counter()
        for _ in range(a.new_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits(llm, n_vocab)))
        decode.append((a.new_tokens - 1) / (time.perf_counter() - t))

    p, d = statistics.median(prefill), statistics.median(decode)
    print(f"RESULT llamacpp load_s={load_s:.1f} threads={a.threads} n_vocab={n_vocab}")
    print(f"RESULT llamacpp prefill prompt_len={a.prompt_len} tokens_per_s={p:.1f}")
    print(f"RESULT llamacpp decode batch=1 new={a.new_tokens} prompt_len={a.decode_prompt_len} tokens_per_s={d:.1f}")
    print(f"(median of {repeat} repeats; prefill {[round(x, 1) for x in prefill]}, decode {[round(x, 1) for x in decode]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
