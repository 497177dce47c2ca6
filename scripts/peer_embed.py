"""The peer of `furnace bench embed`: sentence-transformers on PyTorch (float32 and
bfloat16) embedding the same passages with the same model and batch size.

Usage: python3 scripts/peer_embed.py --model MODEL_DIR --passages target/bench-embed-passages.txt
       [--batch-size 32] [--repeat 3] [--dtype f32|bf16|both]
Prints one JSON line per dtype: sentences/s (median of the repeats) and peak RSS.
"""

import argparse
import json
import resource
import statistics
import time

import torch
from sentence_transformers import SentenceTransformer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--passages", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="both", choices=["f32", "bf16", "both"])
    a = ap.parse_args()
    texts = [line.rstrip("\n") for line in open(a.passages) if line.strip()]
    dtypes = ["f32", "bf16"] if a.dtype == "both" else [a.dtype]
    for dt in dtypes:
        model = SentenceTransformer(a.model, device="cpu")
        if dt == "bf16":
            model = model.to(torch.bfloat16)
        with torch.inference_mode():
            model.encode(texts[: a.batch_size], batch_size=a.batch_size)
            rates = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                model.encode(texts, batch_size=a.batch_size)
                rates.append(len(texts) / (time.perf_counter() - t))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps({"peer": "sentence-transformers", "torch": torch.__version__, "dtype": dt, "threads": torch.get_num_threads(),
                          "passages": len(texts), "batch_size": a.batch_size, "sentences_per_s": statistics.median(rates),
                          "repeats": rates, "peak_rss_bytes": rss}), flush=True)


if __name__ == "__main__":
    main()
