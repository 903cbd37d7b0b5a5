"""Checks that a GGUF written by `zaya quantize` is readable by the ecosystem's `gguf`
package: metadata keys, every tensor's type and shape, and (with --dense DIR) that each
tensor dequantizes close to the checkpoint's own values.

    python scripts/check_gguf.py FILE.gguf [--dense MODEL_DIR]
"""
import argparse
import json

import gguf
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--dense", help="checkpoint directory the file was quantized from")
args = ap.parse_args()

r = gguf.GGUFReader(args.file)
assert r.fields["general.architecture"].contents() == "zaya"
cfg = json.loads(r.fields["zaya.config"].contents())
has_tokenizer = "tokenizer.huggingface.json" in r.fields
kinds = {}
for t in r.tensors:
    kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
print(f"{args.file}: {len(r.tensors)} tensors {kinds}, hidden {cfg['hidden_size']}, tokenizer: {has_tokenizer}")

if args.dense:
    from safetensors.numpy import load_file

    dense = load_file(f"{args.dense}/model.safetensors")
    worst = 0.0
    for t in r.tensors:
        got = gguf.dequantize(t.data, t.tensor_type).reshape(dense[t.name].shape)
        want = dense[t.name].astype(np.float32)
        rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
        worst = max(worst, rel)
    print(f"worst relative dequantization error: {worst:.4f}")
