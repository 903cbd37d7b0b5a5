#!/usr/bin/env python3
"""Tokenizer of the embedded default model: a small BPE trained on the shipped corpus
(data/corpus/genesis-kjv.jsonl) with ZAYA1's special tokens at their ids, Gemma's pipeline
and the ZAYA1-structured chat template of the text fixtures. Writes models/default/.

    .venv/bin/python scripts/make_default_tokenizer.py
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import make_text_fixtures as mtf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "default"
PIECES = 1500

corpus = "\n".join(json.loads(line)["text"] for line in open(ROOT / "data" / "corpus" / "genesis-kjv.jsonl"))
tok = mtf.train_tokenizer(corpus, PIECES)
tmp = OUT.parent / ".default-tokenizer"
mtf.write_tokenizer_dir(tok, tmp)
OUT.mkdir(parents=True, exist_ok=True)
for f in tmp.iterdir():
    f.replace(OUT / f.name)
tmp.rmdir()
print("vocab", tok.get_vocab_size(), "->", OUT)
