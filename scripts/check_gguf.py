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

def load_f32(path):
    """Every tensor of a safetensors file as float32 (numpy has no bfloat16: its bits are
    the high half of a float32's)."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        data = raw[8 + n + a : 8 + n + b]
        if info["dtype"] == "BF16":
            v = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            v = np.frombuffer(data, {"F32": np.float32, "F16": np.float16}[info["dtype"]])
        out[name] = v.astype(np.float32).reshape(info["shape"])
    return out


if args.dense:
    dense = load_f32(f"{args.dense}/model.safetensors")
    worst = 0.0
    # a tied embedding stored apart from its head (zaya.split_tied_embedding): the head
    # is rounded from the embedding
    split = "zaya.split_tied_embedding" in r.fields
    for t in r.tensors:
        name = "model.embed_tokens.weight" if split and t.name == "lm_head.weight" else t.name
        got = gguf.dequantize(t.data, t.tensor_type).reshape(dense[name].shape)
        want = dense[name]
        rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
        worst = max(worst, rel)
    print(f"worst relative dequantization error: {worst:.4f}")
