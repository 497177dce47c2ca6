#!/usr/bin/env python3
"""Writes crates/furnace-rag/testdata/bm25_rank_bm25.json: BM25Okapi scores from rank_bm25
for a small corpus, which furnace-rag's BM25 tests must reproduce.

    python3 -m venv target/idx-venv && target/idx-venv/bin/pip install rank_bm25 numpy
    target/idx-venv/bin/python scripts/make_bm25_fixtures.py
"""
import json
import os

from rank_bm25 import BM25Okapi

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast brown fox! It leaps over lazy dogs, again and again.",
    "Retrieval augmented generation: index the documents, then search the index.",
    "The dog sleeps. The cat sleeps. The fox does not sleep.",
    "BM25 ranks documents by term frequency and inverse document frequency.",
    "Straße und Café: the index handles Unicode words too, café included.",
    "",
    "the the the the fox",
    "Vectors, HNSW graphs and BM25 can be fused with reciprocal rank fusion.",
]

QUERIES = [
    "brown fox",
    "the dog",
    "index documents index",
    "café straße",
    "unknown words only",
    "the",
    "fox sleeps lazy BM25 fusion",
]

DELETED = [1, 7]


def tokenize(text):
    """Lowercase, then split on every character that is not alphanumeric."""
    tokens, current = [], []
    for ch in text.lower():
        if ch.isalnum():
            current.append(ch)
        elif current:
            tokens.append("".join(current))
            current = []
    if current:
        tokens.append("".join(current))
    return tokens


def scores(corpus_tokens, queries):
    bm25 = BM25Okapi(corpus_tokens, k1=1.5, b=0.75, epsilon=0.25)
    return [{"text": q, "tokens": tokenize(q), "scores": [float(s) for s in bm25.get_scores(tokenize(q))]} for q in queries]


def main():
    tokens = [tokenize(t) for t in CORPUS]
    kept = [t for i, t in enumerate(tokens) if i not in DELETED]
    out = {
        "about": "rank_bm25 BM25Okapi(k1=1.5, b=0.75, epsilon=0.25) scores; made by scripts/make_bm25_fixtures.py",
        "corpus": CORPUS,
        "tokens": tokens,
        "queries": scores(tokens, QUERIES),
        "deleted": DELETED,
        "after_delete": scores(kept, QUERIES),
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "crates", "furnace-rag", "testdata", "bm25_rank_bm25.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(path)


if __name__ == "__main__":
    main()
