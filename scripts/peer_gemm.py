#!/usr/bin/env python3
"""Peer of `furnace bench gemm`: torch.matmul in bfloat16 on the same products.

Usage: peer_gemm.py SHAPES.json, where the file (written by furnace) is
{"threads": T, "repeat": R, "shapes": [{"name": ..., "products": [[m, n, k, kind, count], ...]}]}
and kind is "nt" (A[m,k] @ B[n,k].T), "nn" (A[m,k] @ B[k,n]) or "tn" (A[k,m].T @ B[k,n]).
Each shape's products run one torch.matmul each (count times), as PyTorch's training pass
issues them; one warm-up, then R timed repeats. Prints one JSON line per shape:
{"name": ..., "seconds": median}.
"""
import json
import statistics
import sys
import time

import torch


def operands(m, n, k, kind):
    g = torch.Generator().manual_seed(m * 31 + n * 7 + k)
    def r(*shape):
        return (torch.rand(*shape, generator=g) * 0.2 - 0.1).to(torch.bfloat16)
    if kind == "nt":
        a, b = r(m, k), r(n, k)
        return lambda: torch.matmul(a, b.t())
    if kind == "nn":
        a, b = r(m, k), r(k, n)
        return lambda: torch.matmul(a, b)
    if kind == "tn":
        a, b = r(k, m), r(k, n)
        return lambda: torch.matmul(a.t(), b)
    raise ValueError(f"unknown product kind {kind}")


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(int(spec["threads"]))
    repeat = int(spec["repeat"])
    with torch.no_grad():
        for shape in spec["shapes"]:
            calls = []
            for m, n, k, kind, count in shape["products"]:
                f = operands(m, n, k, kind)
                calls.extend([f] * count)
            for f in calls:
                f()
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                for f in calls:
                    f()
                times.append(time.perf_counter() - t)
            print(json.dumps({"name": shape["name"], "seconds": statistics.median(times)}), flush=True)


if __name__ == "__main__":
    main()
