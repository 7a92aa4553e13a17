#!/usr/bin/env python3
"""Makes the PEFT fixtures of tests/fixtures/smollm2/peft: adapters in the
formats tailor serves beyond plain LoRA (DoRA, lora_B bias), written by PEFT
itself, and PEFT's float32 outputs for them and for add_weighted_adapter
compositions, in the format of tests/fixtures/smollm2/reference/*.json.

Run by hand (torch + transformers + peft, ~3 GB from PyPI; CI does not run it):

    python3 -m venv ~/.cache/tailor/peft-venv
    ~/.cache/tailor/peft-venv/bin/pip install torch transformers peft gguf safetensors
    ~/.cache/tailor/peft-venv/bin/python scripts/make-peft-fixtures.py

The base is the shipped GGUF, dequantized to float32 by transformers (as for
every SmolLM2 reference); the random adapters come from fixed seeds.
"""

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path.home() / ".cache/tailor/models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = ROOT / "tests/fixtures/smollm2/peft"
PROMPTS = ROOT / "tests/fixtures/smollm2/reference/pirate.json"
STOP = [2]
GREEDY_STEPS = 24


def base(gguf: Path):
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def randomize(model, seed: int, a_std: float, b_std: float, bias_std: float = 0.0, magnitude_jitter: float = 0.0):
    """Draws every LoRA tensor from `seed`; DoRA's magnitude is set to the
    norm of the adapted weight times a random factor, so that it matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in sorted(model.named_modules(), key=lambda m: m[0]):
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            a, b = module.lora_A["default"], module.lora_B["default"]
            a.weight.copy_(torch.randn(a.weight.shape, generator=gen) * a_std)
            b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * b_std)
            if b.bias is not None:
                b.bias.copy_(torch.randn(b.bias.shape, generator=gen) * bias_std)
            if module.use_dora.get("default"):
                dora = module.lora_magnitude_vector["default"]
                scaling = module.scaling["default"]
                weight = module.get_base_layer().weight
                norm = torch.linalg.norm(weight + scaling * (b.weight @ a.weight), dim=1)
                jitter = 1 + magnitude_jitter * (2 * torch.rand(norm.shape, generator=gen) - 1)
                dora.weight.copy_(norm * jitter)


def make_adapter(gguf: Path, out: Path, config: LoraConfig, half: bool, **draw):
    model = get_peft_model(base(gguf), config)
    randomize(model, **draw)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    if not half:
        return out
    # Stored in float16 (half the bytes in the repository); the references
    # are computed from the saved folder, so they are of these very values.
    # (Not for an adapter the pruning merges read: float16 repeats values,
    # and which of equal magnitudes torch.topk keeps is its own affair.)
    weights = out / "adapter_model.safetensors"
    tensors = {k: v.half().contiguous() for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def run(model, prompt_ids):
    """One prompt: the last position's top-20, every position's argmax, and
    the greedy continuation with the KV cache."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        out = model(input_ids=ids, use_cache=True)
        logits = out.logits[0]
        last = logits[-1]
        top = torch.topk(last, 20)
        record = {
            "prompt_ids": prompt_ids,
            "last": {
                "top": [{"id": int(i), "logit": float(v)} for v, i in zip(top.values, top.indices)],
                "logsumexp": float(torch.logsumexp(last, 0)),
                "argmax": int(last.argmax()),
            },
            "positions": [{"argmax": int(row.argmax())} for row in logits],
        }
        past, step_logits, greedy, steps = out.past_key_values, last, [], []
        for _ in range(GREEDY_STEPS):
            two = torch.topk(step_logits, 2).values
            token = int(step_logits.argmax())
            greedy.append(token)
            steps.append({"id": token, "margin_top1_top2": float(two[0] - two[1])})
            if token in STOP:
                break
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, step_logits = out.past_key_values, out.logits[0, -1]
        record["greedy"] = {"ids": greedy, "steps": steps}
        return record


def reference(model, variant: str, about: str):
    prompts = json.loads(PROMPTS.read_text())["prompts"]
    results = []
    for prompt in prompts:
        record = run(model, prompt["prompt_ids"])
        results.append({"name": prompt["name"], "kind": prompt["kind"], **record})
    margin = min(s["margin_top1_top2"] for r in results for s in r["greedy"]["steps"])
    return {
        "variant": variant,
        "about": about,
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
        "min_greedy_margin": margin,
        "stop_ids": STOP,
        "prompts": results,
    }


def write(path: Path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)} (smallest greedy margin {data['min_greedy_margin']:.4f})")


# (file name, weights of [bias, pirate], combination_type, other arguments)
COMPOSITIONS = [
    ("bias_pirate_cat", [0.6, 0.8], "cat", {}),
    ("bias_pirate_linear", [0.6, 0.8], "linear", {}),
    ("bias_pirate_linear_negative", [0.6, -0.8], "linear", {}),
    ("bias_pirate_ties", [0.6, 0.8], "ties", {"density": 0.5}),
    ("bias_pirate_ties_frequency", [0.6, 0.7], "ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("bias_pirate_magnitude_prune", [0.6, 0.8], "magnitude_prune", {"density": 0.5}),
    ("bias_pirate_svd", [0.6, 0.8], "svd", {}),
    ("bias_pirate_svd_rank4", [0.6, 0.8], "svd", {"svd_rank": 4}),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="*", help="remake only these compositions (keeps the adapters)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    adapters = args.out / "adapters"
    shipped = ROOT / "adapters"

    if args.only is not None:
        return compositions(args, adapters / "bias", shipped)
    # DoRA with rank and alpha patterns: q/v at rank 4, down at rank 2.
    dora = make_adapter(args.gguf, adapters / "dora", LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 16}, use_dora=True, init_lora_weights=False, lora_dropout=0.0,
    ), half=True, seed=26, a_std=0.05, b_std=0.05, magnitude_jitter=0.3)
    # lora_B with a bias, rank 8 like `pirate` (so the merges can take the two).
    bias = make_adapter(args.gguf, adapters / "bias", LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"], alpha_pattern={"o_proj": 32},
        lora_bias=True, init_lora_weights=False, lora_dropout=0.0,
    ), half=False, seed=27, a_std=0.05, b_std=0.03, bias_std=0.05)

    for name, folder in [("dora", dora), ("bias", bias)]:
        model = PeftModel.from_pretrained(base(args.gguf), str(folder)).eval()
        write(args.out / f"{name}.json", reference(model, name, f"PeftModel.from_pretrained(adapters/{name}), un-merged"))

    compositions(args, bias, shipped)


def compositions(args, bias: Path, shipped: Path):
    """add_weighted_adapter over the bias adapter and the shipped pirate."""
    for name, weights, combination, extra in COMPOSITIONS:
        if args.only and name not in args.only:
            continue
        model = PeftModel.from_pretrained(base(args.gguf), str(bias), adapter_name="bias").eval()
        model.load_adapter(str(shipped / "pirate"), adapter_name="pirate")
        model.add_weighted_adapter(["bias", "pirate"], weights, "mix", combination_type=combination, **extra)
        model.set_adapter("mix")
        shown = "".join(f", {k}={v!r}" for k, v in extra.items())
        about = f"add_weighted_adapter(['bias', 'pirate'], {weights}, combination_type='{combination}'{shown})"
        write(args.out / f"{name}.json", reference(model, name, about))


if __name__ == "__main__":
    main()
