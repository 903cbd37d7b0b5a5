#!/usr/bin/env python3
"""The reference side of `zaya bench`: transformers 5.23.0 (torch CPU) on the same weights,
the same token ids (same formula as crates/zaya-cli/src/bench.rs) and the same thread count,
with eager and sdpa attention; prints both side by side with ratios.

    target/release/zaya bench --model DIR --threads 2 --json zaya.json
    .venv/bin/python scripts/bench_reference.py --model DIR --threads 2 --zaya-json zaya.json [--json ref.json]

`--dtype bf16` loads and runs the model in bfloat16 (`zaya bench --dtype bf16` is the match).

Training step (`--train`, against `zaya bench --train --json zaya-train.json`): zero_grad +
forward with labels + backward + AdamW on a 4 x 256 batch of the same token ids, eager and sdpa.
"""
import argparse
import json
import resource
import statistics
import time

import torch
from transformers import ZayaForCausalLM


def bench_ids(rows, length, vocab):
    return torch.tensor([[(i * 7919 + r * 104729 + 13) % (vocab - 3) + 3 for i in range(length)] for r in range(rows)])


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def run(model_dir, attn, a):
    t0 = time.perf_counter()
    model = ZayaForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=DTYPES[a.dtype]).eval()
    load_s = time.perf_counter() - t0
    V = model.config.vocab_size
    ids = bench_ids(1, a.prefill_len, V)
    times = []
    with torch.no_grad():
        for i in range(a.repeats + 1):
            s = time.perf_counter()
            model(input_ids=ids, logits_to_keep=1)
            if i:
                times.append(time.perf_counter() - s)
    prefill = a.prefill_len / statistics.median(times)

    def decode(batch):
        ids = bench_ids(batch, a.prompt_len, V)
        mask = torch.ones_like(ids)
        times = []
        with torch.no_grad():
            for i in range(min(a.repeats, 2) + 1):
                s = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
                p = time.perf_counter() - s
                s = time.perf_counter()
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                               min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0)
                if i:
                    times.append(time.perf_counter() - s - p)
        return batch * (a.new_tokens - 1) / statistics.median(times)

    return {
        "attn": attn,
        "load_s": load_s,
        "prefill_tokens_per_s": prefill,
        "decode_b1_tokens_per_s": decode(1),
        "decode_b8_tokens_per_s": decode(8),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def run_train(model_dir, attn, a):
    t0 = time.perf_counter()
    model = ZayaForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).train()
    load_s = time.perf_counter() - t0
    ids = bench_ids(a.train_batch, a.train_seq_len, model.config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, losses = [], []
    for i in range(a.repeats + 1):
        s = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - s)
        losses.append(loss.item())
    step = statistics.median(times)
    return {
        "attn": attn,
        "load_s": load_s,
        "train_step_s": step,
        "train_tokens_per_s": a.train_batch * a.train_seq_len / step,
        "losses": losses,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train", action="store_true")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--attn", nargs="+", default=["eager", "sdpa"])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="f32",
                   help="inference dtype of the weights and activations (training is always f32)")
    p.add_argument("--zaya-json")
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # Peak RSS is per process: with both backends in one run the second reports the max.
    results = []
    for attn in a.attn:
        results.append((run_train if a.train else run)(a.model, attn, a))
        # each backend's numbers as soon as they exist (a long run cut short keeps them)
        print(json.dumps(results[-1]), flush=True)
    zaya = json.load(open(a.zaya_json)) if a.zaya_json else None
    keys = (["load_s", "train_step_s", "train_tokens_per_s", "peak_rss_bytes"] if a.train else
            ["load_s", "prefill_tokens_per_s", "decode_b1_tokens_per_s", "decode_b8_tokens_per_s", "peak_rss_bytes"])
    print(f"{'metric':<26}" + "".join(f"{'ref ' + r['attn']:>14}" for r in results)
          + (f"{'zaya':>14}{'zaya/ref-' + results[-1]['attn']:>15}" if zaya else ""))
    for k in keys:
        line = f"{k:<26}" + "".join(f"{r[k]:>14.1f}" for r in results)
        if zaya:
            ratio = zaya[k] / results[-1][k] if results[-1][k] else float("nan")
            line += f"{zaya[k]:>14.1f}{ratio:>15.2f}"
        print(line)
    if a.json:
        json.dump({"reference": results, "zaya": zaya}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
