"""Separates the two error sources of a quantized model: the transformers reference runs
with the GGUF's weights dequantized (f32 activations, so only the weight rounding counts)
and is compared with itself in f32, as `zaya eval` compares zaya's quantized model (whose
matmuls also quantize the activations to Q8) with the f32 model.

    python scripts/weights_only_kl.py MODEL_DIR FILE.gguf TEXT [--tokens 3000] [--context 256]
"""
import argparse
import json

import gguf
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("gguf")
ap.add_argument("text")
ap.add_argument("--tokens", type=int, default=3000)
ap.add_argument("--context", type=int, default=256)
a = ap.parse_args()

tok = AutoTokenizer.from_pretrained(a.model)
m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
ids = tok(open(a.text).read(), add_special_tokens=False)["input_ids"][: a.tokens]
bos = tok.bos_token_id


def logps(model):
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), a.context - 1):
            w = [bos] + ids[i : i + a.context - 1]
            logits = model(torch.tensor([w])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1))
    return torch.cat(out)


lp = logps(m)
sd = m.state_dict()
with torch.no_grad():
    for t in gguf.GGUFReader(a.gguf).tensors:
        if t.tensor_type.name in ("F32", "F16", "BF16"):
            continue
        d = gguf.dequantize(t.data, t.tensor_type)
        sd[t.name].copy_(torch.from_numpy(np.ascontiguousarray(d)).reshape(sd[t.name].shape))
lq = logps(m)
kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
top1 = (lp.argmax(-1) == lq.argmax(-1)).float().mean().item()
print(json.dumps({"tokens": lp.shape[0], "weights_only_mean_kl": kl, "top1_agreement": top1}))
