"""Makes the encoder fixtures of furnace-rag's tests: a tiny random BERT sentence encoder
(CLS pooling, no normalisation) and a tiny random BERT cross-encoder, with the vectors and
scores sentence-transformers (on PyTorch) computes for them.

Needs torch, transformers and sentence-transformers (not in CI: run it once, commit the
outputs). Usage: python3 scripts/make_encoder_fixtures.py [MINILM_DIR]
Writes testdata/tiny-bert/, testdata/tiny-cross-encoder/ and testdata/tiny_encoder_cases.jsonl;
with MINILM_DIR (the all-MiniLM-L6-v2 folder, e.g. from `furnace model pull all-minilm-l6-v2`),
also all-MiniLM-L6-v2's vectors of texts of our own (case kind "minilm").
"""

import json
import os
import shutil
import sys

import torch
from tokenizers.implementations import BertWordPieceTokenizer
from sentence_transformers import CrossEncoder, SentenceTransformer, models
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata")
WORDS = (
    "the a an of to in and is was for on with as by at from it this that be are or not "
    "man woman food horse movie rust lora model rank matrix weight train data cat dog sat mat "
    "eating riding new awesome borrow checker adds low frozen query passage document search "
    "paris capital france berlin germany city river what where who how why".split()
)
TEXTS = [
    "A man is eating food.",
    "The new movie is awesome!",
    "Rust has a borrow checker.",
    "LoRA adds low-rank matrices to frozen weights.",
    "the cat sat on the mat",
    "Unknown wørds like zyx and ÄÖÜ fall back to pieces.",
    "",
    "paris " * 80,
]
PAIRS = [
    ("what is the capital of france", "Paris is the capital of France."),
    ("what is the capital of france", "Berlin is a city in Germany."),
    ("who sat on the mat", "the cat sat on the mat"),
    ("rust", "Rust has a borrow checker. " * 20),
    ("", "an empty query"),
]


def vocab(dir_):
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + ["##" + c for c in letters]
    path = os.path.join(dir_, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(tokens) + "\n")
    return path, len(tokens)


def tokenizer(dir_):
    path, n = vocab(dir_)
    wordpiece = BertWordPieceTokenizer(path, lowercase=True)
    tok = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", model_max_length=48)
    tok.save_pretrained(dir_)
    return tok, n


def config(n, **kw):
    return BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                      initializer_range=0.1, **kw)


def main():
    torch.manual_seed(0)
    cases = []

    enc_dir = os.path.join(ROOT, "tiny-bert")
    shutil.rmtree(enc_dir, ignore_errors=True)
    os.makedirs(os.path.join(enc_dir, "1_Pooling"))
    tok, n = tokenizer(enc_dir)
    model = BertModel(config(n), add_pooling_layer=False).eval()
    model.save_pretrained(enc_dir, safe_serialization=True)
    with open(os.path.join(enc_dir, "modules.json"), "w") as f:
        json.dump([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ], f, indent=2)
    with open(os.path.join(enc_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, f, indent=2)
    with open(os.path.join(enc_dir, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": 24, "do_lower_case": False}, f, indent=2)
    st = SentenceTransformer(enc_dir, device="cpu")
    vecs = st.encode(TEXTS, convert_to_numpy=True, batch_size=4)
    cases.append({"kind": "sentence", "model": "tiny-bert", "texts": TEXTS,
                  "vectors": [[float(x) for x in v] for v in vecs],
                  "token_counts": [len(st.tokenizer(t)["input_ids"]) for t in TEXTS]})

    ce_dir = os.path.join(ROOT, "tiny-cross-encoder")
    shutil.rmtree(ce_dir, ignore_errors=True)
    os.makedirs(ce_dir)
    tokenizer(ce_dir)
    torch.manual_seed(1)
    ce_model = BertForSequenceClassification(config(n, num_labels=1)).eval()
    ce_model.save_pretrained(ce_dir, safe_serialization=True)
    ce = CrossEncoder(ce_dir, device="cpu", max_length=40)
    scores = ce.predict(PAIRS, batch_size=2)
    with torch.no_grad():
        enc = ce.tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS], padding=True, truncation="longest_first",
                           max_length=40, return_tensors="pt")
        logits = ce_model(**enc).logits[:, 0]
    cases.append({"kind": "cross", "model": "tiny-cross-encoder", "max_length": 40, "pairs": [list(p) for p in PAIRS],
                  "scores": [float(s) for s in scores], "logits": [float(x) for x in logits]})

    # A llama-family decoder used as an embedder: the final hidden state of the last token,
    # L2-normalised (sentence-transformers' lasttoken pooling + Normalize).
    from transformers import AutoModel, AutoTokenizer
    llama_dir = os.path.join(ROOT, "tiny-llama")
    dec = AutoModel.from_pretrained(llama_dir, dtype=torch.float32).eval()
    dec_tok = AutoTokenizer.from_pretrained(llama_dir)
    dec_texts = TEXTS[:5] + ["a longer text about retrieval " * 6]
    dec_vecs = []
    with torch.no_grad():
        for t in dec_texts:
            ids = dec_tok(t, return_tensors="pt")
            h = dec(**ids).last_hidden_state[0, -1]
            dec_vecs.append([float(x) for x in torch.nn.functional.normalize(h, dim=0)])
    cases.append({"kind": "decoder", "model": "tiny-llama", "texts": dec_texts, "vectors": dec_vecs})

    if len(sys.argv) > 1:
        minilm = SentenceTransformer(sys.argv[1], device="cpu")
        own = TEXTS[:6] + [
            "Retrieval-augmented generation answers from documents.",
            "日本語の文も埋め込めます。",
            "Emoji 🚀🔥 and symbols ∑∫√ in text",
            "How do I fine-tune a model with LoRA on one machine?",
            ("A very long passage that goes on and on about training language models, "
             "adapters, ranks, learning rates and evaluation. ") * 30,
        ]
        vecs = minilm.encode(own, convert_to_numpy=True, batch_size=4)
        cases.append({"kind": "minilm", "texts": own, "vectors": [[float(x) for x in v] for v in vecs]})

    with open(os.path.join(ROOT, "tiny_encoder_cases.jsonl"), "w") as f:
        for c in cases:
            f.write(json.dumps(c) + "\n")


if __name__ == "__main__":
    main()
