#!/usr/bin/env python3
"""Where the reference's training step spends its time, and the matrix-product floor of the
step on this machine: transformers 5.23.0 (torch CPU), one step of `zero_grad` + forward with
labels + backward + AdamW on the same 4 x 256 batch as `zaya bench --train`, under
`torch.profiler` with FLOP counting, after a warm-up step.

    /work/venv/bin/python scripts/profile_reference_train.py --model DIR --threads 2 [--json OUT]

Prints the step time, the time and FLOPs of the matrix products (aten::mm / addmm / bmm /
matmul, forward and backward), the machine's measured f32 GEMM rate at these threads
(torch's own BLAS on a square 2048 product), and the step time a trainer would need if it
ran every matrix product at that rate and nothing else: no trainer can beat it without
doing fewer FLOPs, so it bounds the speed-up any implementation can reach over the
reference on this machine.
"""
import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import ZayaForCausalLM

from bench_reference import bench_ids

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def gemm_rate(threads):
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < 2.0:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = ZayaForCausalLM.from_pretrained(a.model, attn_implementation=a.attn, dtype=torch.float32).train()
    ids = bench_ids(a.train_batch, a.train_seq_len, model.config.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    step()
    plain_s = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        step()
    gemm_us, gemm_flops, total_flops = 0.0, 0, 0
    for e in prof.key_averages():
        total_flops += e.flops or 0
        if e.key in GEMM_OPS:
            gemm_us += e.self_cpu_time_total
            gemm_flops += e.flops or 0
    rate = gemm_rate(a.threads)
    out = {
        "threads": a.threads,
        "attn": a.attn,
        "step_s": plain_s,
        "gemm_s_profiled": gemm_us / 1e6,
        "gemm_gflop": gemm_flops / 1e9,
        "all_counted_gflop": total_flops / 1e9,
        "gemm_rate_gflops_2048": rate / 1e9,
        "gemm_floor_s": gemm_flops / rate,
        "max_speedup_over_reference": plain_s / (gemm_flops / rate),
    }
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    for k, v in out.items():
        print(f"{k:30s} {v:.3f}" if isinstance(v, float) else f"{k:30s} {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
