#!/usr/bin/env python3
"""faiss-cpu on the vectors furnace-rag's benchmark uses, for comparison with
`furnace bench index ... --dump DIR`.

Reads DIR/base.f32 and DIR/queries.f32 (raw little-endian f32) and DIR/meta.json, builds
IndexFlatIP (exact) and IndexHNSWFlat (inner product, M=16, efConstruction=64), sweeps
efSearch and prints JSON with the same fields as furnace's BenchReport: qps on one thread
one query at a time ("single") and on all threads in one batch ("batch"), each the median
of 3 runs, and recall@10 against IndexFlatIP.

    python3 -m venv target/idx-venv && target/idx-venv/bin/pip install faiss-cpu numpy
    target/idx-venv/bin/python scripts/peer_faiss.py DIR [--ef-search 16,32,64,128,256]
"""
import argparse
import json
import os
import time

import faiss
import numpy as np

REPEATS = 3
EXACT_SINGLE_QUERIES = 100  # as furnace's bench: exact one-at-a-time is timed on 100 queries


def median_secs(run):
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return max(sorted(times)[REPEATS // 2], 1e-9)


def one_at_a_time(index, queries, k):
    for i in range(len(queries)):
        index.search(queries[i : i + 1], k)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=64)
    ap.add_argument("--ef-search", default="16,32,64,128,256")
    args = ap.parse_args()

    with open(os.path.join(args.dir, "meta.json")) as f:
        meta = json.load(f)
    n, dim, nq = meta["n"], meta["dim"], meta["queries"]
    base = np.fromfile(os.path.join(args.dir, "base.f32"), dtype="<f4").reshape(n, dim)
    queries = np.fromfile(os.path.join(args.dir, "queries.f32"), dtype="<f4").reshape(nq, dim)
    threads = faiss.omp_get_max_threads()
    k = 10

    flat = faiss.IndexFlatIP(dim)
    flat.add(base)
    truth = None

    def exact_batch():
        nonlocal truth
        _, truth = flat.search(queries, k)

    exact_qps_batch = nq / median_secs(exact_batch)
    faiss.omp_set_num_threads(1)
    single_n = min(nq, EXACT_SINGLE_QUERIES)
    exact_qps_single = single_n / median_secs(lambda: one_at_a_time(flat, queries[:single_n], k))
    faiss.omp_set_num_threads(threads)

    hnsw = faiss.IndexHNSWFlat(dim, args.m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = args.ef_construction
    t = time.perf_counter()
    hnsw.add(base)
    build_secs_all_threads = time.perf_counter() - t

    efs = []
    for ef in [int(e) for e in args.ef_search.split(",")]:
        hnsw.hnsw.efSearch = ef
        got = None

        def batch():
            nonlocal got
            _, got = hnsw.search(queries, k)

        qps_batch = nq / median_secs(batch)
        faiss.omp_set_num_threads(1)
        qps_single = nq / median_secs(lambda: one_at_a_time(hnsw, queries, k))
        faiss.omp_set_num_threads(threads)
        recall = float(np.mean([len(set(truth[i]) & set(got[i])) / k for i in range(nq)]))
        efs.append({"ef_search": ef, "recall_at_10": recall, "qps_single": qps_single, "qps_batch": qps_batch})

    print(
        json.dumps(
            {
                "peer": "faiss-cpu " + faiss.__version__,
                "n": n,
                "dim": dim,
                "queries": nq,
                "m": args.m,
                "ef_construction": args.ef_construction,
                "threads": threads,
                "build_secs_all_threads": build_secs_all_threads,
                "exact_qps_single": exact_qps_single,
                "exact_single_queries": single_n,
                "exact_qps_batch": exact_qps_batch,
                "ef": efs,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
