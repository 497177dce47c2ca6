#!/usr/bin/env python3
"""Regenerate crates/furnace-rag/testdata/split_cases.jsonl with LangChain's splitters.

The Rust splitters in furnace-rag (src/split.rs) must reproduce these chunks exactly.

    python3 -m venv target/split-venv
    target/split-venv/bin/pip install langchain-text-splitters
    target/split-venv/bin/python scripts/make_split_fixtures.py

Each line is one case: the splitter's settings, the input text and the expected chunks
(recursive: text and start index from `add_start_index=True`; markdown: text and metadata).
"""

import json
import os
import random

from langchain_text_splitters import (
    MarkdownHeaderTextSplitter,
    RecursiveCharacterTextSplitter,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "furnace-rag", "testdata", "split_cases.jsonl")

PROSE = (
    "The furnace heats the ore until it melts. Slag floats to the top and is skimmed off.\n\n"
    "Iron sinks. It is tapped from the bottom of the hearth into sand moulds, where it "
    "cools into pigs.\n\nA second paragraph follows, with a sentence that goes on for a "
    "while so that it must be split on spaces when the chunk size is small.\n"
    "A line right after, and another one.\n\n\nThree newlines above this line."
)
UNICODE = (
    "Grüße aus Köln! Ünïcödé everywhere.\n\n"
    "日本語のテキストはスペースを使いません。これは長い文です。\n"
    "中文文本也没有空格，所以必须按字符切分。\n\n"
    "Emoji: 🔥🔥 furnace 🔥 👩‍🔬 scientist 👍🏽 ok. Family: 👨‍👩‍👧‍👦 done.\n"
    "Mixed: αβγ δεζ ηθι κλμ νξο πρσ τυφ χψω."
)
LONG_WORDS = (
    "short words then "
    + "a" * 37
    + " and "
    + "supercalifragilisticexpialidocious" * 2
    + " end.\n"
    + "x" * 55
    + "\n\ntail"
)
NEWLINES = "\n\n\n\nstart\n\n\n\n\nmiddle\n\nend\n\n\n\n" + "\n".join(f"line {i}" for i in range(12))
WHITESPACE = "   leading   spaces   and\t\ttabs   \n   \n  indented line  \n\n\t\n   trailing    "
REPEAT = ("the same sentence again. " * 12).strip() + "\n\n" + ("ab " * 30)
MD = """# Furnace

Intro paragraph under the title.

## Install

Run the installer.
Then check the version.

### From source

```bash
# not a header, a comment in a code fence
cargo build --release
## also not a header
```

More text after the fence.

## Usage

~~~
# tilde fence, not a header
~~~

#NoSpace is not a header
### Deep
Deep content here that is long enough to be split further by the recursive splitter when the chunk size is small.

# Second title
Closing words.
#### Level four
Four.
"""
MD_INLINE = "# A\ntext with ```inline``` code\n## B\nmore\n\n\n## C\n   indented   \n"

TEXTS = {
    "prose": PROSE,
    "unicode": UNICODE,
    "long_words": LONG_WORDS,
    "newlines": NEWLINES,
    "whitespace": WHITESPACE,
    "repeat": REPEAT,
    "markdown": MD,
    "empty": "",
    "one_char": "x",
    "only_spaces": "     \n\n   ",
}

SETTINGS = [(4, 1), (10, 0), (16, 5), (32, 8), (64, 0), (100, 30), (1000, 100)]


def words(s):
    return len(s.split())


def recursive_case(name, text, size, overlap, keep="start", separators=None, length=None):
    kwargs = dict(chunk_size=size, chunk_overlap=overlap, add_start_index=True)
    if keep != "start":
        kwargs["keep_separator"] = keep
    if separators is not None:
        kwargs["separators"] = separators
    if length == "words":
        kwargs["length_function"] = words
    splitter = RecursiveCharacterTextSplitter(**kwargs)
    docs = splitter.create_documents([text])
    return {
        "kind": "recursive",
        "name": name,
        "chunk_size": size,
        "chunk_overlap": overlap,
        "keep_separator": keep,
        "separators": separators,
        "length": length or "chars",
        "text": text,
        "chunks": [{"text": d.page_content, "start": d.metadata["start_index"]} for d in docs],
    }


def markdown_case(name, text, headers, strip_headers=True, return_each_line=False):
    splitter = MarkdownHeaderTextSplitter(
        headers_to_split_on=headers,
        strip_headers=strip_headers,
        return_each_line=return_each_line,
    )
    docs = splitter.split_text(text)
    return {
        "kind": "markdown",
        "name": name,
        "headers": headers,
        "strip_headers": strip_headers,
        "return_each_line": return_each_line,
        "text": text,
        "chunks": [{"text": d.page_content, "metadata": d.metadata} for d in docs],
    }


def main():
    cases = []
    for name, text in TEXTS.items():
        for size, overlap in SETTINGS:
            cases.append(recursive_case(name, text, size, overlap))
    # chunk_size 1 makes a chunk per character: only on short texts, to keep the file small.
    for name in ["empty", "one_char", "only_spaces"]:
        cases.append(recursive_case(name, TEXTS[name], 1, 0))
    cases.append(recursive_case("tiny", "ab c\n\nd🔥", 1, 0))
    for name in ["prose", "long_words", "whitespace", "newlines"]:
        for size, overlap in [(10, 3), (40, 10)]:
            cases.append(recursive_case(name, TEXTS[name], size, overlap, keep="end"))
            cases.append(recursive_case(name, TEXTS[name], size, overlap, keep=False))
    cases.append(recursive_case("prose_sentences", PROSE, 50, 10, separators=[". ", "\n", ""]))
    cases.append(recursive_case("prose_no_empty_sep", PROSE, 20, 0, separators=["\n\n", " "]))
    for size, overlap in [(3, 1), (8, 2), (20, 5)]:
        cases.append(recursive_case("prose_words", PROSE, size, overlap, length="words"))
        cases.append(recursive_case("unicode_words", UNICODE, size, overlap, length="words"))

    # Random texts over a small alphabet rich in separators.
    rng = random.Random(1234)
    alphabet = ["a", "b", "é", "🔥", "中", " ", " ", "\n", "\n\n", "\t", "xyz"]
    for i in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        size = rng.randint(1, 30)
        overlap = rng.randint(0, size - 1)
        keep = rng.choice(["start", "start", "end", False])
        cases.append(recursive_case(f"random_{i}", text, size, overlap, keep=keep))

    all_headers = [("#", "h1"), ("##", "h2"), ("###", "h3"), ("####", "h4"), ("#####", "h5"), ("######", "h6")]
    for name, text in [("markdown", MD), ("inline", MD_INLINE), ("prose", PROSE), ("empty", "")]:
        cases.append(markdown_case(name, text, all_headers))
        cases.append(markdown_case(name, text, all_headers[:2]))
        cases.append(markdown_case(name, text, all_headers, strip_headers=False))
        cases.append(markdown_case(name, text, all_headers, return_each_line=True))
    cases.append(markdown_case("markdown_h3_only", MD, [("###", "Section")]))

    with open(OUT, "w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case, ensure_ascii=False) + "\n")
    print(f"wrote {len(cases)} cases to {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
