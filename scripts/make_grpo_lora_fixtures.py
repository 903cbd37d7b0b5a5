#!/usr/bin/env python3
"""GRPO + LoRA loss fixtures: TRL 1.16 `GRPOTrainer._compute_loss` on a PEFT 0.21.2-wrapped
tiny ZAYA (transformers 5.23, torch, fp32, CPU).

The trainer is built as a LoRA GRPO run is: `GRPOTrainer(model=<base>, peft_config=LoraConfig(...))`
(a new adapter, so TRL's reference policy is the base with the adapters disabled). The LoRA
configurations are those of `scripts/make_lora_fixtures.py` (attention, router MLP and both
expert stacks through `target_parameters`; rsLoRA on a subset), with every adapter weight moved
off its init (B = 0 would make every A gradient zero). For each case it records, under
tests/fixtures/grpo_lora/:

  <case>/adapter/            the adapter (PEFT `save_pretrained`)
  <case>.json                the loss inputs (as tests/fixtures/grpo/*.json): old log-probs
                             from the adapter one iteration earlier (perturbed adapter weights,
                             so ratios != 1 and some clip); reference log-probs, when beta > 0,
                             computed the way TRL does for a PEFT model (`use_adapter(model,
                             None)`: adapters disabled)
  <case>.safetensors         loss, per_token_logps and grad.<adapter key> for every adapter
                             weight (keys as in adapter_model.safetensors)
  meta.json                  the loss settings of every case

Run:  /work/venv/bin/python scripts/make_grpo_lora_fixtures.py
CI never runs this; the fixtures are committed.
"""
import json
import os
import shutil
import sys
import warnings

import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
ROOT = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "grpo_lora")

import peft  # noqa: E402
import trl  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.grpo_trainer import use_adapter  # noqa: E402

from make_grpo_fixtures import load, logps_of, make_inputs, padded  # noqa: E402
from make_lora_fixtures import FIXTURES as LORA  # noqa: E402

assert trl.__version__ == "1.16.0", trl.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__
assert peft.__version__ == "0.21.2", peft.__version__

# case: (LoRA fixture config of make_lora_fixtures.py, GRPOConfig overrides, which inputs)
CASES = {
    # every adaptable module + both expert stacks, tied embeddings + sliding windows, KL to the base
    "full_dapo_beta": ("full", dict(loss_type="dapo", epsilon=0.2, epsilon_high=0.28, beta=0.04),
                       dict(old=True, ref=True, scale=0.3, b=0.003)),
    # rsLoRA on a subset, attention biases, a tool mask, grpo's per-sequence normalisation
    "rslora_grpo_tool_mask": ("rslora", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28),
                              dict(old=True, tool_mask=True, scale=0.5, b=0.02)),
}


def adapter_params(model):
    """Trainable adapter parameters by their saved key (PEFT drops the adapter name)."""
    return {n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "text", "tokenizer"))
    meta = {"generator": "scripts/make_grpo_lora_fixtures.py", "trl": trl.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for case, (lora_name, overrides, which) in CASES.items():
        spec = LORA[lora_name]
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(spec["seed"])
        base = load(spec["base"])
        cfg = base.config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
        settings = dict(
            output_dir="/tmp/grpo-lora-fixture", use_cpu=True, bf16=False, report_to=[],
            per_device_train_batch_size=4, num_generations=2, router_aux_loss_coef=0.0,
            max_completion_length=512,
        )
        settings.update(overrides)
        args = GRPOConfig(**settings)
        trainer = GRPOTrainer(
            model=base,
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": "a"}] * 4),
            processing_class=tok,
            peft_config=LoraConfig(task_type="CAUSAL_LM", **spec["config"]),
        )
        model = trainer.model
        assert "ref" not in model.peft_config, "a new adapter: the reference is the base"
        assert trainer.ref_model is None
        # Off the init, as make_lora_fixtures.py does (B small enough that the policy stays near
        # the base: log-probabilities of a few nats, a KL term that does not explode).
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * which["b"])
                elif "lora_A" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        params = adapter_params(model)
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
            tool_mask[0, 2:4] = 0
            inputs["tool_mask"] = tool_mask
            loss_mask = loss_mask * tool_mask
        inputs["num_items_in_batch"] = loss_mask.sum()
        if which.get("old"):
            # the adapter one iteration earlier: every adapter weight moved by relative noise
            saved = {k: p.detach().clone() for k, p in params.items()}
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in params.values():
                    p.add_(torch.randn(p.shape, generator=g) * which["scale"] * (p.abs().mean() + 1e-3))
            inputs["old_per_token_logps"] = logps_of(trainer, model, input_ids, attention_mask, width)
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(saved[k])
        if which.get("ref"):
            # TRL's reference for a new PEFT adapter: the same model with the adapters disabled
            with use_adapter(model, adapter_name=None):
                inputs["ref_per_token_logps"] = logps_of(trainer, model, input_ids, attention_mask, width)
            base_only = load(spec["base"]).eval()
            with torch.no_grad():
                logits = base_only(input_ids=input_ids, attention_mask=attention_mask).logits
            lp = torch.log_softmax(logits[:, -width - 1:-1].float() / args.temperature, -1)
            want = lp.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
            d = (want - inputs["ref_per_token_logps"]).abs() * completion_mask
            print("ref vs base", d.max().item(), (want - inputs["ref_per_token_logps"]).abs().max().item(), file=sys.stderr)
            assert d.max() < 1e-5, "disabled adapters != base"
        model.zero_grad()
        loss = trainer._compute_loss(model, inputs)
        loss.backward()
        per_token_logps = logps_of(trainer, model, input_ids, attention_mask, width)
        tensors = {"loss": loss.detach().reshape(1), "per_token_logps": per_token_logps.contiguous()}
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, key
            tensors[f"grad.{key}"] = p.grad.detach().clone().contiguous()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        model.zero_grad()
        model.save_pretrained(os.path.join(OUT, case, "adapter"))
        save_file(tensors, os.path.join(OUT, f"{case}.safetensors"))
        doc = {
            "prompt_ids": prompts,
            "completion_ids": completion_ids.tolist(),
            "completion_mask": completion_mask.tolist(),
            "advantages": advantages.tolist(),
        }
        if "tool_mask" in inputs:
            doc["tool_mask"] = inputs["tool_mask"].tolist()
        for key, src in (("old_logps", "old_per_token_logps"), ("ref_logps", "ref_per_token_logps")):
            if src in inputs:
                doc[key] = inputs[src].tolist()
        with open(os.path.join(OUT, f"{case}.json"), "w") as f:
            json.dump(doc, f)
        meta["cases"][case] = {
            "model": spec["base"],
            "lora": lora_name,
            "loss_type": args.loss_type,
            "beta": args.beta,
            "epsilon": args.epsilon,
            "epsilon_high": trainer.epsilon_high,
            "importance_sampling": args.importance_sampling_level,
            "max_completion_length": args.max_completion_length,
            "temperature": args.temperature,
            "use_bias_correction_kl": args.use_bias_correction_kl,
        }
        ratio = (per_token_logps - inputs["old_per_token_logps"]).exp()[completion_mask.bool()]
        print(f"{case}: loss {loss.item():.6f}, {len(params)} adapter weights, "
              f"ratio range [{ratio.min():.3f}, {ratio.max():.3f}]", file=sys.stderr)
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
