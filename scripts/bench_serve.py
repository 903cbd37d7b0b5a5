#!/usr/bin/env python3
"""Serving benchmark: `zaya serve` against `transformers serve` on the same weights, in the same
run. (`--reference-cb` asks for its continuous batching, which transformers 5.23 rejects for
ZAYA: "Invalid layer type: hybrid"; the default reference therefore serves without it.)

For each server and each concurrency level (1, 8, 32 by default) it sends streaming
`/v1/completions` requests (fixed prompt length, `max_tokens` new tokens, greedy) from that
many client threads and measures:
  throughput   generated tokens / wall time of the level (all clients together)
  TTFT         request start -> first streamed token, p50 / p99
  ITL          gaps between consecutive streamed tokens of one request, p50 / p99
Then the prefix cache: a conversation whose first turn is ~2k tokens; the second turn's TTFT
on a zaya server with the prefix cache (after turn 1 warmed it) against a zaya server with
the cache off.

Usage (the model directory needs tokenizer files; see README "Serving"):
  python scripts/bench_serve.py --zaya target/release/zaya --model DIR [--threads 2]
      [--levels 1,8,32] [--prompt-tokens 64] [--max-tokens 64] [--no-reference] [--json OUT]
Prints a table and writes JSON. Needs `openai`; the reference needs `transformers[serving]`.
"""

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_health(url, proc, timeout=600):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def start_zaya(args, extra=()):
    port = free_port()
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads), CANDLE_NUM_THREADS=str(args.threads), ZAYA_LOG="warn")
    cmd = [args.zaya, "serve", "--model", args.model, "--port", str(port), "--served-model-name", "bench",
           "--attn", args.attn, "--max-running", "32", *shlex.split(args.zaya_args), *extra]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_health(url, proc)
    return proc, url, "bench"


def start_reference(args):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    cmd = [exe, "serve", os.path.abspath(args.model), "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    if args.reference_cb:
        # transformers 5.23's continuous-batching cache rejects ZAYA's layer types
        # ("Invalid layer type: hybrid"), so this is off by default.
        cmd.append("--continuous-batching")
    log = open(os.path.join(args.out_dir, "transformers-serve.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_health(url, proc)
    return proc, url, os.path.abspath(args.model)


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def one_request(client, model, prompt, max_tokens, extra):
    t0 = time.perf_counter()
    stamps = []
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       extra_body=extra)
    for ch in stream:
        if ch.choices:
            stamps.append(time.perf_counter())
    return t0, stamps


def run_level(url, model, prompts, level, per_client, max_tokens, extra):
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=1800)
    results, lock = [], threading.Lock()

    def worker(w):
        for k in range(per_client):
            r = one_request(client, model, prompts[(w * per_client + k) % len(prompts)], max_tokens, extra)
            with lock:
                results.append(r)

    # warm-up
    one_request(client, model, prompts[0], 4, extra)
    t = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(level)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(len(s) for _, s in results)
    ttft = [s[0] - t0 for t0, s in results if s]
    itl = [b - a for _, s in results for a, b in zip(s, s[1:])]
    return {
        "concurrency": level,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "throughput_tok_s": tokens / wall,
        "ttft_p50_ms": pct(ttft, 50) * 1e3,
        "ttft_p99_ms": pct(ttft, 99) * 1e3,
        "itl_p50_ms": pct(itl, 50) * 1e3,
        "itl_p99_ms": pct(itl, 99) * 1e3,
    }


def prompts_of(n_tokens, count):
    words = "in the beginning god created the heaven and the earth and the earth was without form".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(n_tokens)) for i in range(count)]


def prefix_cache(args):
    """Second-turn TTFT with and without the prefix cache (two zaya servers)."""
    system = " ".join(prompts_of(1900, 1))
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Tell of the first day."}]
    out = {}
    for label, extra in [("cache", []), ("no_cache", ["--prefix-cache-mib", "0"])]:
        proc, url, model = start_zaya(args, extra)
        try:
            c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=1800)
            a1 = c.chat.completions.create(model=model, messages=turn1, max_tokens=8, temperature=0)
            turn2 = turn1 + [{"role": "assistant", "content": a1.choices[0].message.content or "."},
                             {"role": "user", "content": "And the second?"}]
            ttfts, answers, cached, prompt = [], [], 0, 0
            for _ in range(args.prefix_repeats):
                t0 = time.perf_counter()
                first, text = None, ""
                for ch in c.chat.completions.create(model=model, messages=turn2, max_tokens=8, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}):
                    if ch.choices and first is None:
                        first = time.perf_counter()
                    if ch.choices and ch.choices[0].delta.content:
                        text += ch.choices[0].delta.content
                    if ch.usage:
                        cached = ch.usage.prompt_tokens_details.cached_tokens
                        prompt = ch.usage.prompt_tokens
                ttfts.append((first - t0) * 1e3)
                answers.append(text)
                if label == "no_cache":
                    break
            out[label] = {"ttft_ms": statistics.median(ttfts), "cached_tokens": cached, "prompt_tokens": prompt, "answer": answers[0]}
        finally:
            stop(proc)
    out["speedup"] = out["no_cache"]["ttft_ms"] / out["cache"]["ttft_ms"]
    out["same_answer"] = out["cache"]["answer"] == out["no_cache"]["answer"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zaya", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--prefix-repeats", type=int, default=3)
    ap.add_argument("--zaya-args", default="", help="more `zaya serve` arguments, e.g. '--tp 2' (a mesh of local ranks)")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--reference-cb", action="store_true", help="transformers serve --continuous-batching (fails for ZAYA in 5.23)")
    ap.add_argument("--no-prefix", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out-dir", default="bench-out")
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    prompts = prompts_of(args.prompt_tokens, 64)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    report = {"cpu": cpu, "threads": args.threads, "zaya_args": args.zaya_args, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "servers": {}}
    servers = [("zaya", lambda: start_zaya(args))]
    if not args.no_reference:
        servers.append(("transformers", lambda: start_reference(args)))
    for name, start in servers:
        proc, url, model = start()
        try:
            report["servers"][name] = []
            for level in levels:
                per_client = max(1, args.requests_per_client if level > 1 else 2 * args.requests_per_client)
                # transformers rejects unknown fields; its random-weight answers rarely hit EOS
                extra = {"ignore_eos": True} if name == "zaya" else None
                r = run_level(url, model, prompts, level, per_client, args.max_tokens, extra)
                report["servers"][name].append(r)
                print(f"{name:12} c={level:<3} {r['throughput_tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:8.1f} p99 {r['ttft_p99_ms']:8.1f} ms"
                      f"  ITL p50 {r['itl_p50_ms']:7.1f} p99 {r['itl_p99_ms']:7.1f} ms", flush=True)
        finally:
            stop(proc)
    if not args.no_prefix:
        report["prefix_cache"] = prefix_cache(args)
        p = report["prefix_cache"]
        print(f"prefix cache: 2nd-turn TTFT {p['cache']['ttft_ms']:.1f} ms (cached {p['cache']['cached_tokens']}/{p['cache']['prompt_tokens']} tokens)"
              f" vs {p['no_cache']['ttft_ms']:.1f} ms without: {p['speedup']:.2f}x; same answer: {p['same_answer']}")
    print()
    print(f"CPU: {cpu}, {args.threads} threads; prompt {args.prompt_tokens} tokens, {args.max_tokens} new tokens, greedy, streaming")
    print("| server | concurrency | throughput (tok/s) | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for name, rows in report["servers"].items():
        for r in rows:
            print(f"| {name} | {r['concurrency']} | {r['throughput_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} |")
    z = {r["concurrency"]: r["throughput_tok_s"] for r in report["servers"]["zaya"]}
    ratios = {}
    if "transformers" in report["servers"]:
        t = {r["concurrency"]: r["throughput_tok_s"] for r in report["servers"]["transformers"]}
        ratios["vs_reference"] = {c: z[c] / t[c] for c in z if c in t}
    if 1 in z:
        ratios["vs_own_c1"] = {c: z[c] / z[1] for c in z}
    report["ratios"] = ratios
    print(json.dumps(ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
