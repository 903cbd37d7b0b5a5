"""What transformers 5.23 `decode` gives for ids past the tokenizer's vocabulary.

The default model's embedding has 1984 rows but its tokenizer 1925 entries, so `generate`
can produce ids 1925..1983. `zaya detokenize` / `generate` / `chat` decode them as this
prints (`''`: the ids are dropped), see crates/zaya-cli/tests/robustness.rs.

    /work/venv/bin/python scripts/check_padded_vocab.py models/default
"""

import sys

from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "models/default")
print(f"tokenizer entries: {len(tok)}")
for ids in ([1925], [1983], [2, 1925], [1925, 1930], [5, 1925, 6]):
    print(ids, repr(tok.decode(ids)), repr(tok.decode(ids, skip_special_tokens=True)))
