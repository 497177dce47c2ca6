"""Writes the reference fixtures of `furnace data prepare` under testdata/prepare/:

- token_counts.jsonl: SFT rows in chat, prompt/completion and instruction form, each with
  `n_tokens`, the length of the row formatted with testdata/tiny-llama's chat template and
  tokenized by Hugging Face transformers (apply_chat_template, then the tokenizer without
  special tokens) -- what `furnace train` feeds the model, and what --min/--max-tokens count.
- near_dups.jsonl: prompt/completion rows, some of them near-duplicates (one word changed) or
  exact duplicates (case and spacing changed) of others; near_pairs.json: the exact Jaccard
  similarity of the character 5-gram shingle sets of every pair of rows (the quantity MinHash
  estimates), over the normalized content "role: content" lines (lowercased, whitespace runs
  made one space).

Run: /path/to/venv/bin/python scripts/make_prepare_fixtures.py (needs transformers)."""
import itertools
import json
import pathlib

from transformers import AutoTokenizer

root = pathlib.Path(__file__).resolve().parent.parent
out = root / "testdata" / "prepare"
out.mkdir(parents=True, exist_ok=True)
tok = AutoTokenizer.from_pretrained(root / "testdata" / "tiny-llama")


def conversation(row):
    if "messages" in row:
        return row["messages"]
    msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    if "prompt" in row:
        msgs.append({"role": "user", "content": row["prompt"]})
        msgs.append({"role": "assistant", "content": row["completion"]})
    else:
        user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
        msgs.append({"role": "user", "content": user})
        msgs.append({"role": "assistant", "content": row["output"]})
    return msgs


rows = [
    {"prompt": "Hi", "completion": "Hello."},
    {"prompt": "What is the capital of France?", "completion": "Paris is the capital of France."},
    {"system": "Be terse.", "prompt": "Name a prime.", "completion": "7"},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
    {"messages": [
        {"role": "system", "content": "You are a helpful assistant who explains things step by step."},
        {"role": "user", "content": "Why is the sky blue? Explain it to a ten year old."},
        {"role": "assistant", "content": "Sunlight is made of many colours. Blue light bounces off the tiny bits of air much more than red light does, so blue comes at your eyes from every direction of the sky."},
    ]},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Summarize the text in one sentence.", "input": "The meeting was moved from Monday to Wednesday because the room was booked, and everyone agreed.", "output": "The meeting moved to Wednesday since the room was taken."},
    {"messages": [
        {"role": "user", "content": "Give me a number."},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Another one, larger."},
        {"role": "assistant", "content": "Forty-two."},
    ]},
]
with open(out / "token_counts.jsonl", "w") as f:
    for row in rows:
        text = tok.apply_chat_template(conversation(row), tokenize=False)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        f.write(json.dumps({**row, "n_tokens": n}) + "\n")

base = [
    ("How do I make a cup of green tea?", "Heat fresh water until it is just below boiling, about eighty degrees, pour it over one teaspoon of leaves and let it steep for two to three minutes before you drink it."),
    ("What does a compiler do?", "A compiler reads the source code of a program and translates it into machine code or another lower level form that a computer can run directly."),
    ("Suggest a name for a small grey cat.", "Smokey, Ash, Pebble or Misty would all suit a small grey cat."),
    ("Explain what photosynthesis is in two sentences.", "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar and oxygen. The sugar feeds the plant and the oxygen goes into the air we breathe."),
    ("Write a haiku about the sea.", "Grey waves fold and break, salt wind carries gull voices, the tide keeps its time."),
    ("How do I make a cup of black coffee?", "Grind the beans medium fine, use about fifteen grams for a mug, pour hot water over them slowly and wait four minutes before pressing."),
]
near = [
    # one word changed ("leaves" -> "tea"): a near duplicate of row 1
    ("How do I make a cup of green tea?", "Heat fresh water until it is just below boiling, about eighty degrees, pour it over one teaspoon of tea and let it steep for two to three minutes before you drink it."),
    # case and spacing changed: an exact duplicate of row 2
    ("what does a  compiler do?", "A compiler reads the source code of a program and translates it into machine code or another lower level form that a computer can   run directly."),
    # one word changed ("plants" -> "trees"): a near duplicate of row 4
    ("Explain what photosynthesis is in two sentences.", "Photosynthesis is how trees turn sunlight, water and carbon dioxide into sugar and oxygen. The sugar feeds the plant and the oxygen goes into the air we breathe."),
]
dup_rows = [{"prompt": p, "completion": c} for p, c in base + near]
with open(out / "near_dups.jsonl", "w") as f:
    for row in dup_rows:
        f.write(json.dumps(row) + "\n")


def shingles(row, size=5):
    text = "\n".join(f"{m['role']}: {m['content']}" for m in conversation(row))
    norm = " ".join(w.lower() for w in text.split())
    if len(norm) <= size:
        return {norm}
    return {norm[i:i + size] for i in range(len(norm) - size + 1)}


pairs = []
for (i, a), (j, b) in itertools.combinations(enumerate(dup_rows), 2):
    sa, sb = shingles(a), shingles(b)
    pairs.append({"a": i + 1, "b": j + 1, "jaccard": len(sa & sb) / len(sa | sb)})
with open(out / "near_pairs.json", "w") as f:
    json.dump(pairs, f, indent=1)
    f.write("\n")
print(out)
