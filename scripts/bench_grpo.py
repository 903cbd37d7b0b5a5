#!/usr/bin/env python3
"""One GRPO step, zaya against TRL 1.16's GRPOTrainer (transformers generate, no vLLM), on the
same model, group size, prompt and completion lengths, in the same run; prints a table and
writes JSON.

    /work/venv/bin/python scripts/bench_grpo.py --zaya target/release/zaya \
        [--config bench/configs/small.json] [--steps 3] [--json OUT.json]

The model is `zaya init` of the config (random weights: EOS is practically never sampled, so
every completion has the full length), with the default model's tokenizer files. Both sides:
f32, 2 threads, one prompt x `--num-generations` completions of `--completion-length` tokens
per step (per_device_train_batch_size = num_generations, one optimizer step per generation),
loss dapo, beta 0, AdamW. The first step is a warm-up; the median of the rest is reported.
Time split: generation / scoring / training (TRL: `_generate` timed by a wrapper, scoring =
`_calculate_rewards`, training = the rest of the step).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make_model(zaya, config, out):
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    subprocess.run([zaya, "init", "--config", config, "--seed", "1", "--out", out], check=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
        shutil.copy(os.path.join(ROOT, "models", "default", f), out)


def run_zaya(args, model, data):
    out = os.path.join(args.work, "zaya-run")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [args.zaya, "grpo", "--model", model, "--data", data, "--out", out,
           "--reward", "regex", "--regex", "a",
           "--num-generations", str(args.num_generations), "--batch-size", str(args.num_generations),
           "--max-completion-length", str(args.completion_length), "--max-steps", str(args.steps + 1),
           "--attn", "sdpa", "--save-every", "0"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    t = time.time()
    subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
    rows = []
    with open(os.path.join(out, "grpo.csv")) as f:
        header = f.readline().strip().split(",")
        for line in f:
            r = dict(zip(header, line.strip().split(",")))
            rows.append({k: float(r[k]) for k in ("gen_seconds", "score_seconds", "train_seconds", "completion_len_mean")})
    return rows[1:], time.time() - t


def run_trl(args, model_dir, prompt):
    import torch
    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from transformers import AutoTokenizer, ZayaForCausalLM
    from trl import GRPOConfig, GRPOTrainer
    from transformers import TrainerCallback

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = ZayaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = args.num_generations
    cfg = GRPOConfig(
        output_dir=os.path.join(args.work, "trl-run"), use_cpu=True, bf16=False, report_to=[],
        per_device_train_batch_size=n, num_generations=n, max_completion_length=args.completion_length,
        max_steps=args.steps + 1, logging_steps=1, save_strategy="no", learning_rate=1e-6,
        router_aux_loss_coef=0.0, seed=42, dataloader_num_workers=0,
        # fastest TRL: no activation checkpointing (zaya runs without it too)
        activation_checkpointing=False,
    )
    ds = Dataset.from_list([{"prompt": prompt}] * (args.steps + 2))
    timing = {"gen": [], "score": [], "step": [], "len": []}

    def reward(completions, **kw):
        return [1.0 if "a" in c else 0.0 for c in completions]

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok)
    gen, score = trainer._generate, trainer._calculate_rewards

    def timed_gen(*a, **k):
        t = time.time()
        out = gen(*a, **k)
        timing["gen"].append(time.time() - t)
        return out

    def timed_score(*a, **k):
        t = time.time()
        out = score(*a, **k)
        timing["score"].append(time.time() - t)
        return out

    trainer._generate, trainer._calculate_rewards = timed_gen, timed_score

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.time()

        def on_step_end(self, *a, **k):
            timing["step"].append(time.time() - self.t)

    trainer.add_callback(Clock())
    trainer.train()
    lens = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    rows = []
    for i in range(1, len(timing["step"])):
        g, s, total = timing["gen"][i], timing["score"][i], timing["step"][i]
        rows.append({"gen_seconds": g, "score_seconds": s, "train_seconds": total - g - s,
                     "completion_len_mean": lens[i] if i < len(lens) else float("nan")})
    return rows


def median(rows, key):
    return statistics.median(r[key] for r in rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zaya", default=os.path.join(ROOT, "target", "release", "zaya"))
    ap.add_argument("--config", default=os.path.join(ROOT, "bench", "configs", "small.json"))
    ap.add_argument("--work", default="/tmp/zaya-bench-grpo")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--completion-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    model = os.path.join(args.work, "model")
    make_model(args.zaya, args.config, model)
    prompt = "And God said unto Abraham, Get thee out of thy country"
    data = os.path.join(args.work, "prompts.jsonl")
    with open(data, "w") as f:
        for _ in range(args.steps + 2):
            f.write(json.dumps({"prompt": prompt}) + "\n")
    z, _ = run_zaya(args, model, data)
    t = run_trl(args, model, prompt)
    res = {}
    print("| per step (s) | TRL GRPOTrainer | zaya | TRL / zaya |")
    print("|---|---|---|---|")
    for key, label in [("gen_seconds", "generation"), ("score_seconds", "scoring"), ("train_seconds", "training")]:
        a, b = median(t, key), median(z, key)
        res[key] = {"trl": a, "zaya": b}
        ratio = f"{a / b:.2f}" if b >= 0.01 else "—"
        print(f"| {label} | {a:.3f} | {b:.3f} | {ratio} |")
    ta = sum(res[k]["trl"] for k in res)
    za = sum(res[k]["zaya"] for k in res)
    res["total"] = {"trl": ta, "zaya": za, "speedup": ta / za}
    print(f"| **step** | {ta:.3f} | {za:.3f} | **{ta / za:.2f}** |")
    print(f"completion length: TRL {median(t, 'completion_len_mean'):.1f}, zaya {median(z, 'completion_len_mean'):.1f}")
    res["settings"] = vars(args)
    res["cpu"] = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    res["loadavg"] = open("/proc/loadavg").read().split()[:3]
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
