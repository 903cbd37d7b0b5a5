#!/usr/bin/env python3
"""GRPO loss fixtures from TRL 1.16 `GRPOTrainer._compute_loss` (transformers 5.23, torch, fp32).

For fixed prompts, completions, advantages, old and reference log-probabilities on the tiny
parity models of `tests/fixtures/models`, records what TRL computes: the loss, the per-token
log-probabilities and the gradient of every parameter, for every `loss_type`, `beta` 0 and
> 0, `epsilon_high` != `epsilon`, token and sequence importance sampling, `num_iterations` 2
(old log-probabilities from the previous iteration's weights, so ratios != 1 and some clip),
on-policy (no old log-probabilities), a tool mask and `dr_grpo`'s `max_completion_length`.

The trainer is TRL's own (`GRPOTrainer` built with a `GRPOConfig`), and the loss is its
`_compute_loss` on the inputs `_generate_and_score_completions` would produce (left-padded
prompts, right-padded completions). The router balance term is off
(`router_aux_loss_coef=0.0`): `zaya grpo-loss` computes the policy loss only.

Run:  /work/venv/bin/python scripts/make_grpo_fixtures.py   # writes tests/fixtures/grpo/*
CI never runs this; the fixtures are committed.
"""
import copy
import json
import os
import sys
import warnings

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "grpo")

import trl  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoTokenizer, ZayaForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

assert trl.__version__ == "1.16.0", trl.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

# Every case: (fixture model, GRPOConfig overrides, which inputs).
CASES = {
    "dapo": ("mha_bias", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28), dict(old=True)),
    "grpo": ("mha_bias", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28), dict(old=True)),
    "dr_grpo": ("mha_bias", dict(loss_type="dr_grpo", epsilon=0.2, max_completion_length=16), dict(old=True)),
    "bnpo_tool_mask": ("mha_bias", dict(loss_type="bnpo", epsilon=0.2, epsilon_high=0.28), dict(old=True, tool_mask=True)),
    "cispo": ("mha_bias", dict(loss_type="cispo", epsilon=0.2, epsilon_high=1.1), dict(old=True)),
    "sapo": ("mha_bias", dict(loss_type="sapo"), dict(old=True)),
    "luspo_sequence": ("mha_bias", dict(loss_type="luspo", importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4), dict(old=True)),
    "grpo_sequence_beta": ("mha_bias", dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.04, epsilon=3e-4, epsilon_high=4e-4), dict(old=True, ref=True)),
    "dapo_beta_on_policy": ("mha_bias", dict(loss_type="dapo", beta=0.04), dict(old=False, ref=True)),
    "dapo_tied_sliding": ("gqa_sliding", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.02), dict(old=True, ref=True, scale=0.004)),
}


def load(name):
    model = ZayaForCausalLM.from_pretrained(os.path.join(ROOT, "models", name), dtype=torch.float32)
    return model


def perturbed(model, scale, seed):
    """A copy with every parameter moved by relative noise: the weights of the previous
    iteration (old log-probabilities) or of a reference model."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.abs().mean() + 1e-3))
    return other


def make_inputs(vocab, pad, eos, seed):
    """Four rows (two prompts x a group of two), prompts of different lengths, completions of
    different lengths (one ending with EOS, the others truncated), right-padded."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [5, 5, 3, 3]
    completion_lens = [7, 4, 6, 2]
    prompts = []
    completions = []
    for i, (pl, cl) in enumerate(zip(prompt_lens, completion_lens)):
        p = torch.randint(2, vocab, (pl,), generator=g).tolist() if i % 2 == 0 else prompts[-1]
        c = torch.randint(2, vocab, (cl,), generator=g).tolist()
        if i == 1:
            c[-1] = eos
        prompts.append(p)
        completions.append(c)
    return prompts, completions


def padded(rows, pad, side):
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = [pad] * (width - len(r))
        ids.append(fill + r if side == "left" else r + fill)
        m = [0] * (width - len(r))
        one = [1] * len(r)
        mask.append(m + one if side == "left" else one + m)
    return torch.tensor(ids), torch.tensor(mask)


def logps_of(trainer, model, input_ids, attention_mask, width):
    with torch.no_grad():
        lp, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, width)
    return lp


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "text", "tokenizer"))
    meta = {"generator": "scripts/make_grpo_fixtures.py", "trl": trl.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for case, (fixture, overrides, which) in CASES.items():
        torch.manual_seed(0)
        model = load(fixture)
        cfg = model.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
        settings = dict(
            output_dir="/tmp/grpo-fixture", use_cpu=True, bf16=False, report_to=[],
            per_device_train_batch_size=4, num_generations=2, router_aux_loss_coef=0.0,
            max_completion_length=overrides.get("max_completion_length", 512),
        )
        settings.update(overrides)
        args = GRPOConfig(**settings)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "a"}] * 4),
            processing_class=tok,
        )
        model = trainer.model
        model.train()
        trainer.current_gradient_accumulation_steps = 1
        prompts, completions = make_inputs(cfg.vocab_size, pad, eos, seed=len(case))
        prompt_ids, prompt_mask = padded(prompts, pad, "left")
        completion_ids, completion_mask = padded(completions, pad, "right")
        width = completion_ids.size(1)
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        advantages = torch.tensor([0.9, -0.9, -1.3, 1.3])
        inputs = {
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": advantages,
        }
        loss_mask = completion_mask.clone()
        if which.get("tool_mask"):
            tool_mask = torch.ones_like(completion_mask)
            tool_mask[0, 2:4] = 0  # two tool-result tokens inside row 0's completion
            inputs["tool_mask"] = tool_mask
            loss_mask = loss_mask * tool_mask
        inputs["num_items_in_batch"] = loss_mask.sum()
        if which.get("old"):
            old_model = perturbed(model, which.get("scale", 0.06), seed=1)
            inputs["old_per_token_logps"] = logps_of(trainer, old_model, input_ids, attention_mask, width)
        if which.get("ref"):
            ref_model = perturbed(model, 1.3 * which.get("scale", 0.06), seed=2)
            inputs["ref_per_token_logps"] = logps_of(trainer, ref_model, input_ids, attention_mask, width)
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        per_token_logps = logps_of(trainer, model, input_ids, attention_mask, width)
        tensors = {"loss": loss.detach().reshape(1), "per_token_logps": per_token_logps.contiguous()}
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            tensors[f"grad.{name}"] = p.grad.detach().contiguous()
        save_file(tensors, os.path.join(OUT, f"{case}.safetensors"))
        mask_list = completion_mask.tolist()
        doc = {
            "prompt_ids": prompts,
            "completion_ids": completion_ids.tolist(),
            "completion_mask": mask_list,
            "advantages": advantages.tolist(),
        }
        if "tool_mask" in inputs:
            doc["tool_mask"] = inputs["tool_mask"].tolist()
        for key, src in (("old_logps", "old_per_token_logps"), ("ref_logps", "ref_per_token_logps")):
            if src in inputs:
                doc[key] = inputs[src].tolist()
        with open(os.path.join(OUT, f"{case}.json"), "w") as f:
            json.dump(doc, f)
        flags = {
            "model": fixture,
            "loss_type": args.loss_type,
            "beta": args.beta,
            "epsilon": args.epsilon,
            "epsilon_high": trainer.epsilon_high,
            "importance_sampling": args.importance_sampling_level,
            "max_completion_length": args.max_completion_length,
            "temperature": args.temperature,
            "use_bias_correction_kl": args.use_bias_correction_kl,
        }
        meta["cases"][case] = flags
        clipped = ""
        if "old_per_token_logps" in inputs:
            ratio = (per_token_logps - inputs["old_per_token_logps"]).exp()[completion_mask.bool()]
            clipped = f" ratio range [{ratio.min():.3f}, {ratio.max():.3f}]"
        print(f"{case}: loss {loss.item():.6f}{clipped}", file=sys.stderr)
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
