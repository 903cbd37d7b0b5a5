#!/usr/bin/env python3
"""External check: a model written by zaya (`zaya init`, or any native export) loads in
transformers 5.23 and both compute the same logits.

    .venv/bin/python scripts/check_against_reference.py MODEL_DIR [ZAYA_BIN]
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file
from transformers import ZayaForCausalLM

model_dir = sys.argv[1]
zaya = sys.argv[2] if len(sys.argv) > 2 else "target/release/zaya"
ref = ZayaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
V = ref.config.vocab_size
ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
with tempfile.TemporaryDirectory() as tmp:
    inp = os.path.join(tmp, "in.json")
    out = os.path.join(tmp, "out.safetensors")
    json.dump({"input_ids": ids.tolist()}, open(inp, "w"))
    subprocess.run([zaya, "forward", "--model", model_dir, "--inputs", inp, "--out", out], check=True)
    got = load_file(out)["logits"]
with torch.no_grad():
    want = ref(input_ids=ids, use_cache=False).logits
diff = (got - want).abs().max().item()
print(f"max abs logit diff zaya vs transformers: {diff:.3g}")
sys.exit(0 if diff < 1e-4 else 1)
