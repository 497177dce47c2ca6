#!/usr/bin/env python3
"""Runs a GGUF file with llama.cpp (through llama-cpp-python) for furnace's GGUF export tests.

Usage: check_gguf_llamacpp.py MODEL.gguf [REQUESTS.jsonl]   (requests on stdin without a file)

Each request is one JSON object per line:
  {"tokens": [ids...], "n": 16}     greedy continuation of these exact token ids (nothing added)
  {"text": "...", "n": 16}          the same after llama.cpp tokenizes the text (BOS only when the
                                    model's metadata asks for it, never twice; special tokens
                                    written in the text are parsed)
  {"tokenize": "..."}               llama.cpp's ids of the text (no BOS; special tokens parsed)

Writes one JSON object on stdout: {"results": [...]} with, for each request in order,
{"prompt": [ids], "tokens": [generated ids]} or {"ids": [ids]}. Greedy decoding is the arg-max
of llama.cpp's logits at each step (ties go to the lowest id), stopping early at an
end-of-generation token, which is included. Needs target/llamacpp-venv (scripts/llamacpp-venv.sh).
"""

import json
import sys

import numpy as np
from llama_cpp import Llama


def is_eog(llm: Llama, tok: int) -> bool:
    """Whether llama.cpp ends generation at `tok` (EOS, EOT and the like)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok))


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    model_path = sys.argv[1]
    stream = open(sys.argv[2], encoding="utf-8") if len(sys.argv) > 2 else sys.stdin
    requests = [json.loads(line) for line in stream if line.strip()]
    n_ctx = max([len(r.get("tokens", [])) + int(r.get("n", 0)) for r in requests] + [256]) + 64
    # An f32 KV cache (GGML type 0; llama.cpp's default is f16), so an f16 file's logits are
    # those of its weights and not of a rounded cache: near ties then break as furnace's do.
    llm = Llama(
        model_path=model_path, n_ctx=n_ctx, n_threads=2, n_batch=512, logits_all=False, verbose=False, type_k=0, type_v=0
    )
    bos = llm.token_bos()
    n_vocab = llm.n_vocab()
    results = []
    for r in requests:
        if "tokenize" in r:
            ids = llm.tokenize(r["tokenize"].encode("utf-8"), add_bos=False, special=True)
            results.append({"ids": ids})
            continue
        if "tokens" in r:
            prompt = list(r["tokens"])
        else:
            # add_bos=True adds BOS only when the model's metadata asks for it.
            prompt = llm.tokenize(r["text"].encode("utf-8"), add_bos=True, special=True)
            if len(prompt) >= 2 and prompt[0] == bos and prompt[1] == bos:
                prompt = prompt[1:]
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(int(r.get("n", 16))):
            # The logits of the last evaluated position (llama-cpp-python no longer copies
            # them into llm.scores unless logits_all is on).
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)).copy()
            tok = int(np.argmax(logits))
            out.append(tok)
            if is_eog(llm, tok):
                break
            llm.eval([tok])
        results.append({"prompt": prompt, "tokens": out})
    json.dump({"results": results}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
