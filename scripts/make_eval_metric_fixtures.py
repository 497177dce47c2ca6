#!/usr/bin/env python3
"""Writes crates/furnace-evals/tests/fixtures/metric_cases.jsonl: the built-in metrics of
furnace-evals (src/metrics/) computed by the reference implementations, which
crates/furnace-evals/tests/metrics.rs must reproduce.

- exact_match, contains, token_f1: SQuAD v1.1's official evaluation script
  (normalize_answer, exact_match_score, f1_score, metric_max_over_ground_truths), copied
  below; `contains` is normalize_answer(ref) in normalize_answer(pred) (an empty reference
  matches nothing, as furnace documents).
- rouge_l: Google's rouge-score, RougeScorer(['rougeL'], use_stemmer=False).score_multi.
- bleu: sacrebleu.sentence_bleu(pred, refs) with its defaults, divided by 100.
- regex: Python's re.search (patterns chosen to mean the same in Rust's regex crate).
- numeric_match, json_valid, json_field: no reference library exists; computed here by an
  independent Python version of the rules furnace documents.
- precision_at_k, recall_at_k, hit_rate, mrr, ndcg_at_k: ranx.evaluate (precision@k,
  recall@k, hit_rate@k, mrr@k, ndcg@k) with binary relevance, the retrieved list given to
  ranx as scores decreasing with rank (a repeated id keeps its first position). ranx
  refuses an empty run or empty qrels, so "no relevant id" is given to it as one judged
  document of relevance 0, and "nothing retrieved" as one retrieved id that is not relevant
  (the same scores as the empty lists under ranx's definitions); the Rust side passes the
  empty lists.

Regenerate (ranx compiles with numba on first use: about a minute):

    python3 -m venv /tmp/venv-evalfix
    /tmp/venv-evalfix/bin/pip install rouge-score sacrebleu ranx numpy
    /tmp/venv-evalfix/bin/python scripts/make_eval_metric_fixtures.py
"""
import collections
import json
import math
import os
import re
import string

import sacrebleu
from ranx import Qrels, Run, evaluate
from rouge_score import rouge_scorer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "furnace-evals", "tests", "fixtures", "metric_cases.jsonl")


# --- SQuAD v1.1 evaluate-v1.1.py ---------------------------------------------------------
def normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


# --- the rules furnace documents for metrics without a reference library -----------------
def contains_norm(pred, refs):
    p = normalize_answer(pred)
    return float(any(normalize_answer(r) and normalize_answer(r) in p for r in refs))



def last_number(s):
    """The last number of `s`, read as furnace's `numbers_in` documents it."""
    found = None
    for m in re.finditer(r"-?(?:[0-9]+(?:,[0-9]{3}(?![0-9]))*(?:\.[0-9]+)?|(?<![0-9])\.[0-9]+)", s):
        text, start = m.group(0), m.start()
        if text.startswith("-") and start > 0 and s[start - 1].isascii() and s[start - 1].isalnum():
            text = text[1:]
        found = float(text.replace(",", ""))
    return found


def numeric_match(pred, refs, rel_tol, abs_tol):
    p = last_number(pred)
    if p is None:
        return 0.0
    for r in refs:
        x = last_number(r)
        if x is not None and math.isclose(p, x, rel_tol=rel_tol, abs_tol=abs_tol):
            return 1.0
    return 0.0


def strict_json(text):
    def bad(c):
        raise ValueError(c)

    return json.loads(text, parse_constant=bad)


def strip_fence(pred):
    t = pred.strip()
    if len(t) >= 6 and t.startswith("```") and t.endswith("```"):
        inner = t[3:-3]
        if inner[:4].lower() == "json":
            inner = inner[4:]
        return inner.strip()
    return t


def parse_pred(pred):
    try:
        return True, strict_json(strip_fence(pred))
    except ValueError:
        return False, None


def json_eq(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_eq(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def json_field(pred, refs, path):
    ok, v = parse_pred(pred)
    if not ok:
        return 0.0
    if path:
        for seg in path.split("."):
            if isinstance(v, dict) and seg in v:
                v = v[seg]
            elif isinstance(v, list) and seg.isdigit() and int(seg) < len(v):
                v = v[int(seg)]
            else:
                return 0.0
    for r in refs:
        try:
            if json_eq(v, strict_json(r)):
                return 1.0
        except ValueError:
            pass
        if isinstance(v, str) and v == r:
            return 1.0
    return 0.0


# --- cases --------------------------------------------------------------------------------
TEXT = [
    ("Paris", ["Paris"]),
    ("paris.", ["Paris"]),
    ("The Eiffel Tower", ["Eiffel tower"]),
    ("an apple a day", ["apple day"]),
    ("", ["something"]),
    ("something", [""]),
    ("", [""]),
    ("the", ["a"]),
    ("Barack Obama was the 44th president", ["Barack Obama", "Obama"]),
    ("He was born in 1961.", ["1961", "August 4, 1961"]),
    ("the cat sat on the mat", ["the cat is on the mat", "there is a cat on the mat"]),
    ("the the the the the the the", ["the cat is on the mat"]),
    ("cat cat cat dog", ["cat dog dog"]),
    ("It's a dog's life, isn't it?", ["its a dogs life isnt it"]),
    ("Café Straße naïve résumé", ["cafe strasse naive resume", "Café Straße"]),
    ("東京は日本の首都です", ["東京"]),
    ("Zürich — the largest city in Switzerland!", ["Zurich", "largest city"]),
    ("3.14159", ["3.14", "3.14159"]),
    ("1,234,567 people", ["1234567 people"]),
    ("well-known state-of-the-art models", ["well known state of the art models"]),
    ("U.S.A. and U.K.", ["USA and UK"]),
    ("Hello,world!How are you?", ["Hello, world! How are you?"]),
    ("  spaced   out\ttext\nwith lines  ", ["spaced out text with lines"]),
    ("A quick brown fox jumps over the lazy dog near the river bank in the early morning light while birds sing",
     ["The quick brown fox jumped over a lazy dog by the river bank early in the morning as the birds sang"]),
    ("The committee approved the new budget after a long debate that lasted three days and involved many amendments",
     ["After three days of debate and many amendments, the committee approved the budget",
      "The new budget was approved by the committee"]),
    ("price: $19.99 (20% off) & free shipping <today>", ["price $19.99, 20% off and free shipping today"]),
    ("&quot;quoted&quot; &amp; escaped &lt;tag&gt;", ['"quoted" & escaped <tag>']),
    ("dates 2024-01-15 and 12-3", ["dates 2024 - 01 - 15 and 12 - 3"]),
    ("end with period .", ["end with period."]),
    ("a, b, c, d.", ["a b c d"]),
    ("x1 y2 z3 x1 y2", ["x1 y2 z3"]),
    ("ROUGE and BLEU are metrics", ["rouge and bleu are metrics"]),
    ("completely unrelated words here", ["nothing matches at all", "zero overlap indeed"]),
    ("one two three four five", ["one two three four five six seven eight nine ten"]),
    ("one two three four five six seven eight nine ten", ["one two three four five"]),
    ("one", ["one two", "one two three"]),
    ("one two", ["one", "one two three"]),
    ("ünïcödé ónly", ["ünïcödé"]),
    ("İstanbul is big", ["istanbul is big"]),
    ("tab\tseparated\x1ctokens", ["tab separated tokens"]),
    ("The answer is (B) 42.", ["(B)", "42"]),
    ("Answer: an", ["an"]),
    ("she said \"yes\" -- then 'no'", ["she said yes then no"]),
    ("repeat repeat repeat repeat", ["repeat"]),
    ("under_score and hy-phen", ["under score and hy phen", "underscore and hyphen"]),
    ("Mixed CASE Words", ["mixed case words"]),
    ("a.b,c;d:e", ["a b c d e"]),
    ("Ünits: 5kg, 3.5m, 10°C", ["5 kg 3.5 m 10 C"]),
    ("NASA's Apollo 11 landed in 1969", ["Apollo 11 landed on the Moon in 1969", "In 1969"]),
    ("\u00a0non\u00a0breaking\u00a0spaces\u00a0", ["non breaking spaces"]),
]

REGEX = [
    ("The answer is B.", r"\b[B]\b"),
    ("answer: c", r"(?i)^answer:\s*[abcd]$"),
    ("no letter here", r"\b[ABCD]\b"),
    ("2024-01-15", r"^\d{4}-\d{2}-\d{2}$"),
    ("", r"^$"),
    ("line one\nline two", r"two$"),
]

NUMERIC = [
    ("The answer is 42.", ["42"], 1e-9, 0.0),
    ("About 1,234 people", ["1234"], 1e-9, 0.0),
    ("It is -3.5 degrees", ["-3.5"], 1e-9, 0.0),
    ("pages 3-4", ["4"], 1e-9, 0.0),
    ("pages 3-4", ["-4"], 1e-9, 0.0),
    ("first 10 then 20", ["10"], 1e-9, 0.0),
    ("first 10 then 20", ["10", "20"], 1e-9, 0.0),
    ("roughly 3.14159", ["3.1416"], 1e-4, 0.0),
    ("roughly 3.14159", ["3.1416"], 1e-9, 0.0),
    ("0.1 + 0.2 = 0.30000000000000004", ["0.3"], 1e-9, 0.0),
    ("result 0.001", ["0"], 0.0, 0.01),
    ("50%", ["50"], 1e-9, 0.0),
    ("no numbers", ["5"], 1e-9, 0.0),
    ("7", ["no number"], 1e-9, 0.0),
    ("value .5", ["0.5"], 1e-9, 0.0),
    ("1,2,3", ["3"], 1e-9, 0.0),
    ("$1,000,000.50 total", ["1000000.5"], 1e-9, 0.0),
    ("version 1.2.3", ["3"], 1e-9, 0.0),
    ("x-5", ["5"], 1e-9, 0.0),
    ("#### 72", ["The answer is 72"], 1e-9, 0.0),
]

JSON_VALID = [
    '{"a": 1}',
    '  [1, 2, 3]  ',
    '```json\n{"a": {"b": [1, {"c": "x"}]}}\n```',
    '```\n{"ok": true}\n```',
    '```JSON\n[]\n```',
    '{"a": 1,}',
    'not json',
    '',
    '42',
    '"a string"',
    'NaN',
    '{"a": 1} trailing',
    'Here is the JSON: {"a": 1}',
]

JSON_FIELD = [
    ('{"a": {"b": [1, {"c": "x"}]}}', ["x"], "a.b.1.c"),
    ('{"a": {"b": [1, {"c": "x"}]}}', ['"x"'], "a.b.1.c"),
    ('{"a": {"b": [1, {"c": "x"}]}}', ["1"], "a.b.0"),
    ('{"a": {"b": [1, {"c": "x"}]}}', ["1.0"], "a.b.0"),
    ('{"a": {"b": [1, {"c": "x"}]}}', ["2"], "a.b.0"),
    ('{"a": {"b": [1, {"c": "x"}]}}', ["x"], "a.b.5.c"),
    ('{"a": {"b": [1, {"c": "x"}]}}', ["x"], "a.z"),
    ('```json\n{"name": "Ada", "age": 36}\n```', ["Ada"], "name"),
    ('{"name": "Ada", "age": 36}', ["36"], "age"),
    ('{"name": "Ada", "age": 36}', ['{"age": 36, "name": "Ada"}'], ""),
    ('{"flag": true}', ["true"], "flag"),
    ('{"flag": true}', ["1"], "flag"),
    ('{"n": "42"}', ["42"], "n"),
    ('{"v": null}', ["null"], "v"),
    ('{"list": [1, 2]}', ["[1, 2.0]"], "list"),
    ('not json', ["x"], "a"),
    ('[10, 20, 30]', ["30"], "2"),
    ('{"a": 1}', ["no", "1"], "a"),
]

RETRIEVAL = [
    (["d1", "d2", "d3", "d4", "d5"], ["d2", "d4"]),
    (["d1", "d2", "d3", "d4", "d5"], ["d1"]),
    (["d1", "d2", "d3"], ["d9"]),
    (["d1", "d2"], ["d2", "d3", "d4"]),
    (["d3", "d1", "d3", "d2", "d1", "d5"], ["d1", "d5"]),
    (["a"], ["a"]),
    (["x", "y", "z", "a", "b", "c", "d", "e", "f", "g", "h", "i"], ["h", "i", "x"]),
    (["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10"], ["r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11"]),
    (["n1", "n2", "n3", "n4", "rel"], ["rel"]),
    (["p1", "p2", "p3"], []),
    ([], ["q1", "q2"]),
    (["s1", "s2", "s3", "s4", "s5", "s6"], ["s6", "s5", "s4", "s3", "s2", "s1"]),
]

KS = [1, 3, 5, 10]
RANX = {"precision_at_k": "precision", "recall_at_k": "recall", "hit_rate": "hit_rate", "mrr": "mrr", "ndcg_at_k": "ndcg"}


def ranx_scores(retrieved, relevant, k):
    seen = []
    for d in retrieved:
        if d not in seen:
            seen.append(d)
    if not seen:
        seen = ["__nothing_retrieved__"]
    qrels = {d: 1 for d in relevant} if relevant else {"__no_relevant__": 0}
    run = {d: float(len(seen) - i) for i, d in enumerate(seen)}
    names = [f"{m}@{k}" for m in RANX.values()]
    scores = evaluate(Qrels({"q": qrels}), Run({"q": run}), names, make_comparable=True)
    return {kind: float(scores[f"{m}@{k}"]) for kind, m in RANX.items()}


def main():
    rows = []
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for pred, refs in TEXT:
        rows.append({"metric": "exact_match", "pred": pred, "refs": refs, "normalize": True,
                     "expected": float(metric_max_over_ground_truths(exact_match_score, pred, refs))})
        rows.append({"metric": "exact_match", "pred": pred, "refs": refs, "normalize": False,
                     "expected": float(pred in refs)})
        rows.append({"metric": "contains", "pred": pred, "refs": refs, "normalize": True, "expected": contains_norm(pred, refs)})
        rows.append({"metric": "token_f1", "pred": pred, "refs": refs,
                     "expected": float(metric_max_over_ground_truths(f1_score, pred, refs))})
        rows.append({"metric": "rouge_l", "pred": pred, "refs": refs,
                     "expected": float(scorer.score_multi(refs, pred)["rougeL"].fmeasure)})
        rows.append({"metric": "bleu", "pred": pred, "refs": refs, "expected": sacrebleu.sentence_bleu(pred, refs).score / 100.0})
    for pred, pattern in REGEX:
        rows.append({"metric": "regex", "pred": pred, "pattern": pattern, "expected": float(re.search(pattern, pred) is not None)})
    for pred, refs, rel_tol, abs_tol in NUMERIC:
        rows.append({"metric": "numeric_match", "pred": pred, "refs": refs, "rel_tol": rel_tol, "abs_tol": abs_tol,
                     "expected": numeric_match(pred, refs, rel_tol, abs_tol)})
    for pred in JSON_VALID:
        rows.append({"metric": "json_valid", "pred": pred, "expected": float(parse_pred(pred)[0])})
    for pred, refs, path in JSON_FIELD:
        rows.append({"metric": "json_field", "pred": pred, "refs": refs, "path": path, "expected": json_field(pred, refs, path)})
    for retrieved, relevant in RETRIEVAL:
        for k in KS:
            for kind, value in ranx_scores(retrieved, relevant, k).items():
                rows.append({"metric": kind, "retrieved": retrieved, "relevant": relevant, "k": k, "expected": value})
    with open(OUT, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} cases to {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
