#!/usr/bin/env python3
"""Give a benchmark checkpoint the routing of a trained ZAYA1: balanced experts.

`zaya init` writes random weights whose routers send most tokens of a prompt to one or two
experts per layer (the medium bench model: 250-500 of 512 prefill tokens on one expert),
so a prefill on it is nearly a dense model's. A trained ZAYA1 spreads tokens over its
experts: the PID controller of training moves the per-layer `balancing_biases` (added to the
router probabilities for the top-1 choice only; the expert weight stays the unbiased
probability) until the experts' loads even out. This script does the same for the token ids
that `zaya bench` and `scripts/bench_reference.py` feed (`bench_ids`): it runs
`zaya forward --router-logits` on them, fits each layer's biases so that no expert takes more
than 1.25x its even share, writes them into the checkpoint in place (17 floats a layer), and
repeats, since a layer's routing changes the next layers' inputs.

The original biases are kept in `balancing_biases.orig.json` in the model directory;
`--restore` writes them back. Both engines read the same file, so the benchmark compares them
on the same routing.

    python3 scripts/balance_router.py --model /work/medium --zaya target/release/zaya
    python3 scripts/balance_router.py --model /work/medium --restore

Needs numpy and safetensors (the reference virtualenv has both). On the 8B bf16 bench model
the fit converges in the first layers only (eight passes: layer 0 at 40 rows, the others
45-150 against 155-511 before; rounding the probabilities to bf16 for the fit made it
worse): the small and medium f32 models settle at <= 42 rows in every layer within three
passes.
"""

import argparse
import json
import os
import struct
import subprocess
import tempfile

import numpy as np
from safetensors.numpy import load_file


def bias_offsets(model):
    """(file, byte offset) of every layer's `balancing_biases` in the checkpoint."""
    index = os.path.join(model, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = json.load(open(index))["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = ["model.safetensors"]
    found = {}
    for name in files:
        path = os.path.join(model, name)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        for key, meta in header.items():
            if key.endswith("mlp.gate.balancing_biases"):
                if meta["dtype"] != "F32":
                    raise SystemExit(f"{key} in {path} is {meta['dtype']}, expected F32")
                layer = int(key.split(".layers.")[1].split(".")[0])
                found[layer] = (path, 8 + n + meta["data_offsets"][0], meta["shape"][0])
    if not found:
        raise SystemExit(f"no balancing_biases in {model} (the legacy layout is not handled)")
    return [found[l] for l in sorted(found)]


def read(offsets):
    out = []
    for path, off, n in offsets:
        with open(path, "rb") as f:
            f.seek(off)
            out.append(np.frombuffer(f.read(4 * n), dtype=np.float32).copy())
    return np.stack(out)


def write(offsets, biases):
    for (path, off, n), b in zip(offsets, biases):
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(np.asarray(b, dtype=np.float32).tobytes())


def bench_ids(length, vocab):
    """`zaya::bench::bench_ids` for row 0."""
    span, base = (vocab - 3, 3) if vocab > 3 else (max(vocab, 1), 0)
    return [((i * 7919 + 13) % span) + base for i in range(length)]


def fit(probs, beta, experts, slack):
    """Biases for the real experts so that argmax(probs + beta) spreads evenly; the skip
    expert's bias is left alone."""
    target = probs.shape[0] / experts
    lr = 2e-4
    for _ in range(40000):
        counts = np.bincount((probs[:, :experts] + beta).argmax(1), minlength=experts)
        if counts.max() <= target * slack:
            break
        beta = beta - lr * (counts - target) / target
        lr *= 0.9997
    # Real experts at or below 0: some expert keeps bias 0, so the skip expert (π − 1 ≤ 0)
    # still never wins where it never did.
    return beta - beta.max()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--zaya", default="target/release/zaya")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--slack", type=float, default=1.25, help="largest share / even share")
    ap.add_argument("--restore", action="store_true")
    args = ap.parse_args()

    offsets = bias_offsets(args.model)
    backup = os.path.join(args.model, "balancing_biases.orig.json")
    if args.restore:
        write(offsets, np.array(json.load(open(backup))))
        os.remove(backup)
        print(f"restored the original balancing biases of {len(offsets)} layers")
        return
    if not os.path.exists(backup):
        json.dump(read(offsets).tolist(), open(backup, "w"))
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    experts = cfg["num_experts"]
    biases = read(offsets).astype(np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        inputs = os.path.join(tmp, "in.json")
        out = os.path.join(tmp, "out.safetensors")
        json.dump({"input_ids": [bench_ids(args.prefill_len, cfg["vocab_size"])]}, open(inputs, "w"))
        for it in range(args.iters + 1):
            subprocess.run(
                [args.zaya, "forward", "--model", args.model, "--dtype", args.dtype,
                 "--inputs", inputs, "--out", out, "--router-logits"],
                check=True, capture_output=True,
            )
            d = load_file(out)
            shares = [int(np.bincount(d[f"expert_choice.{l}"], minlength=experts + 1).max())
                      for l in range(len(offsets))]
            print(f"pass {it}: largest expert share per layer {shares}", flush=True)
            if it == args.iters:
                break
            for l in range(len(offsets)):
                logits = d[f"router_logits.{l}"].astype(np.float64)
                p = np.exp(logits - logits.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                biases[l, :experts] = fit(p, biases[l, :experts], experts, args.slack)
            write(offsets, biases)


if __name__ == "__main__":
    main()
