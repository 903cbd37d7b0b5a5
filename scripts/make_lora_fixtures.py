#!/usr/bin/env python3
"""LoRA golden fixtures from the reference (peft 0.21.2 + transformers 5.23.0, torch, fp32, CPU).

Takes two of the committed tiny ZAYA fixtures (tests/fixtures/models/{gqa_sliding,mha_bias}) as
base models, wraps them with `get_peft_model` and a LoRA config that touches attention, the
router MLP and the stacked experts (`target_parameters`), moves every adapter weight off its
init (B = 0 at init would make every A gradient zero and hide the whole path), and records into
tests/fixtures/lora/<name>/:

  adapter/                 the adapter as PEFT's `save_pretrained` writes it
                           (adapter_config.json + adapter_model.safetensors)
  reference.safetensors    single.logits / batch.logits with the adapter (eval mode),
                           train.loss and train.grad.<adapter key> for every adapter weight
                           (key as in adapter_model.safetensors), and the same for the
                           left-padded train_pad batch
  keys.json                the adapter keys and their shapes

Run:  /work/venv/bin/python scripts/make_lora_fixtures.py
      /work/venv/bin/python scripts/make_lora_fixtures.py --check-zaya-adapter NAME DIR OUT.safetensors
The second form checks that an adapter written by zaya (DIR) loads in PEFT over the fixture
base NAME and gives the logits zaya wrote (`zaya forward --adapter DIR --out OUT.safetensors`
on NAME's single.json) within 1e-4 (prints the largest difference).
CI never runs this; the fixtures are committed.
"""
import json
import os
import shutil
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import ZayaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "tests", "fixtures", "models")
ROOT = os.path.join(HERE, "..", "tests", "fixtures", "lora")

FIXTURES = {
    # Every linear layer of attention and the router, and both expert stacks.
    "full": dict(
        base="gqa_sliding",
        seed=11,
        config=dict(
            r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj_current", "v_proj_delayed", "o_proj",
                            "down_proj", "fc1", "fc2", "out_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    ),
    # rsLoRA, a subset of modules, one expert stack; attention biases and an untied head.
    "rslora": dict(
        base="mha_bias",
        seed=12,
        config=dict(
            r=3, lora_alpha=5, lora_dropout=0.0, use_rslora=True,
            target_modules=["q_proj", "v_proj_current", "o_proj", "fc2"],
            target_parameters=["experts.gate_up_proj"],
        ),
    ),
}


def load_base(name):
    return ZayaForCausalLM.from_pretrained(os.path.join(MODELS, name), attn_implementation="eager",
                                           experts_implementation="eager").eval()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def as_batch(d):
    ids = torch.tensor(d["input_ids"])
    mask = torch.tensor(d["attention_mask"]) if "attention_mask" in d else None
    labels = torch.tensor(d["labels"]) if "labels" in d else None
    return ids, mask, labels


def make(name, spec):
    out_dir = os.path.join(ROOT, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    torch.manual_seed(spec["seed"])
    gen = torch.Generator().manual_seed(spec["seed"])
    base = load_base(spec["base"])
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **spec["config"]))
    # Off the init (B = 0): both factors get draws of their own, sized so that the adapter
    # changes the logits clearly without swamping the base.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "lora_A" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(os.path.join(out_dir, "adapter"))
    saved = load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
    state = get_peft_model_state_dict(model)
    assert set(saved) == set(state), (set(saved) ^ set(state))

    # Which trainable parameter is which saved key: PEFT drops the adapter name.
    params = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            key = pname.replace(".default.", ".")
            assert key in saved, (pname, key)
            params[key] = p
    assert set(params) == set(saved), set(params) ^ set(saved)

    tensors = {}
    models_dir = os.path.join(MODELS, spec["base"])
    model.eval()
    for tag in ["single", "batch"]:
        ids, mask, _ = as_batch(read_json(os.path.join(models_dir, f"{tag}.json")))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        tensors[f"{tag}.logits"] = out.logits
    for tag in ["train", "train_pad"]:
        ids, mask, labels = as_batch(read_json(os.path.join(models_dir, f"{tag}.json")))
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        tensors[f"{tag}.loss"] = out.loss.detach().reshape(1)
        for key, p in params.items():
            assert p.grad is not None and p.grad.abs().sum() > 0, key
            tensors[f"{tag}.grad.{key}"] = p.grad.detach().clone()
        # the base stays frozen
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, pname
    model.zero_grad()
    model.eval()

    # Merged weights give the same logits (PEFT's own merge, for the record).
    ids, mask, _ = as_batch(read_json(os.path.join(models_dir, "single.json")))
    merged = model.merge_and_unload()
    with torch.no_grad():
        tensors["single.logits_merged"] = merged(input_ids=ids, use_cache=False).logits

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(out_dir, "reference.safetensors"))
    with open(os.path.join(out_dir, "keys.json"), "w") as f:
        json.dump({k: list(v.shape) for k, v in sorted(saved.items())}, f, indent=1)
    meta = {
        "generator": "scripts/make_lora_fixtures.py",
        "base": spec["base"],
        "peft": __import__("peft").__version__,
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "seed": spec["seed"],
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    diff = (tensors["single.logits_merged"] - tensors["single.logits"]).abs().max().item()
    base = load_base(spec["base"])
    with torch.no_grad():
        effect = (base(input_ids=ids, use_cache=False).logits - tensors["single.logits"]).abs().max().item()
    print(name, "adapter keys", len(saved), "train loss", tensors["train.loss"].item(),
          "adapter effect on logits", effect, "merged-vs-unmerged", diff)


def check_zaya_adapter(name, adapter_dir, zaya_out):
    """An adapter saved by zaya loads in PEFT and gives zaya's logits."""
    spec = FIXTURES[name]
    base = load_base(spec["base"])
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids, mask, _ = as_batch(read_json(os.path.join(MODELS, spec["base"], "single.json")))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    got = load_file(zaya_out)["logits"]
    diff = (want - got).abs().max().item()
    n = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_)
    print(f"{adapter_dir}: PEFT loaded {n} adapter weights; max |logits(PEFT) - logits(zaya)| = {diff:.3e}")
    if diff > 1e-4:
        raise SystemExit("MISMATCH")
    print("OK")


if __name__ == "__main__":
    torch.set_num_threads(2)
    if sys.argv[1:2] == ["--check-zaya-adapter"]:
        check_zaya_adapter(*sys.argv[2:5])
        sys.exit(0)
    for name in sys.argv[1:] or list(FIXTURES):
        make(name, FIXTURES[name])
