#!/usr/bin/env python3
"""Makes the PEFT fixtures of tests/fixtures/smollm2/peft: adapters in the
formats tailor serves beyond plain LoRA (DoRA, lora_B bias, modules_to_save), written by PEFT
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

import copy

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
    parser.add_argument("--only", nargs="*", help="remake only these compositions (keeps the adapters), "
                        "or `saved_modules` (the modules_to_save adapters and their references), "
                        "or `dora_weights` (the DoRA adapter at other weights)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    adapters = args.out / "adapters"
    shipped = ROOT / "adapters"

    if args.only == ["saved_modules"]:
        return saved_modules(args, adapters, shipped)
    if args.only == ["dora_weights"]:
        return dora_weights(args, adapters / "dora")
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

    dora_weights(args, dora)
    saved_modules(args, adapters, shipped)
    compositions(args, bias, shipped)


# A DoRA adapter at a request's weight: PEFT's set_scale (the scale times
# the weight, in the norms too).
DORA_WEIGHTS = [("dora_weight_half", 0.5), ("dora_weight_negative", -0.5)]


def dora_weights(args, dora: Path):
    for name, weight in DORA_WEIGHTS:
        model = PeftModel.from_pretrained(base(args.gguf), str(dora)).eval()
        for module in model.modules():
            if hasattr(module, "set_scale") and hasattr(module, "lora_A"):
                module.set_scale("default", weight)
        about = f"PeftModel.from_pretrained(adapters/dora), every LoRA layer set_scale('default', {weight})"
        write(args.out / f"{name}.json", reference(model, name, about))


def saved_modules(args, adapters: Path, shipped: Path):
    wholes = {}
    for seed, name in enumerate(SAVED_MODULES, start=28):
        wholes[name] = make_saved(args.gguf, adapters / name, name, seed)
        model = PeftModel.from_pretrained(base(args.gguf), str(wholes[name])).eval()
        about = f"PeftModel.from_pretrained(adapters/{name} with its tables rebuilt from {RECIPE})"
        write(args.out / f"{name}.json", reference(model, name, about))
    saved_compositions(args, wholes["saved"], shipped)


# Whole modules an adapter replaces. The embedding and the head are the
# base's plus a rank-one change u·vᵀ; the repository keeps u and v
# (`saved_recipe.safetensors`) and the tests rebuild the tables from the
# base they load, so no 57 MB table is committed.
SAVED_MODULES = {
    "saved": dict(modules_to_save=["embed_tokens", "lm_head", "input_layernorm", "norm"]),
    "tied": dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True),
}
RECIPE = "saved_recipe.safetensors"


def make_saved(gguf: Path, out: Path, name: str, seed: int):
    """The adapter folder to commit (LoRA and norms; the tables as a recipe)
    and, in a temporary folder, the whole adapter PEFT loads."""
    model = get_peft_model(base(gguf), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj"], init_lora_weights=False, lora_dropout=0.0,
        **SAVED_MODULES[name],
    ))
    randomize(model, seed=seed, a_std=0.05, b_std=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    # u and v per table, and which pair each table is made with (a head
    # tied to the saved embedding is the same tensor, changed once).
    recipe, owner, pairs = {}, {}, {}
    with torch.no_grad():
        for module_name, module in sorted(model.named_modules(), key=lambda m: m[0]):
            if type(module).__name__ != "ModulesToSaveWrapper":
                continue
            weight = module.modules_to_save["default"].weight
            if weight.dim() == 1:  # a norm: each weight jittered by up to 20 %
                weight.mul_(1 + 0.2 * (2 * torch.rand(weight.shape, generator=gen) - 1))
                continue
            key = "lm_head" if module_name.endswith("lm_head") else "embed_tokens"
            if weight.data_ptr() in owner:
                pairs[key] = owner[weight.data_ptr()]
                continue
            owner[weight.data_ptr()] = pairs[key] = key
            # Values float16 can hold, so both sides compute the same sums.
            u = (torch.randn(weight.shape[0], generator=gen) * 0.2).half().float()
            v = (torch.randn(weight.shape[1], generator=gen) * 0.2).half().float()
            weight.add_(torch.outer(u, v))
            recipe[f"{key}.u"], recipe[f"{key}.v"] = u.contiguous(), v.contiguous()
    whole = Path(tempfile.mkdtemp()) / name
    model.save_pretrained(str(whole))
    tensors = load_file(str(whole / "adapter_model.safetensors"))
    tables = {k for k in tensors if k.endswith(("embed_tokens.weight", "lm_head.weight"))}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy(whole / "adapter_config.json", out / "adapter_config.json")
    kept = {k: v.half().contiguous() if "lora_" in k else v.contiguous() for k, v in tensors.items() if k not in tables}
    save_file(kept, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    made_with = ",".join(f"{t}={pairs['lm_head' if t.endswith('lm_head.weight') else 'embed_tokens']}"
                         for t in sorted(tables))
    save_file(recipe, str(out / RECIPE), metadata={"format": "pt", "tables": made_with})
    # The reference loads exactly what the tests rebuild: the committed
    # (float16) LoRA and the tables from u·vᵀ.
    save_file({**kept, **{k: tensors[k] for k in tables}}, str(whole / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return whole


def saved_compositions(args, whole: Path, shipped: Path):
    """add_weighted_adapter of `saved` and pirate, with saved's whole modules
    kept in the result: PEFT's merged adapter runs the base's modules
    instead (it drops modules_to_save; tailor keeps each from the one
    adapter that replaces it)."""
    for combination in ["cat", "linear"]:
        model = PeftModel.from_pretrained(base(args.gguf), str(whole), adapter_name="saved").eval()
        model.load_adapter(str(shipped / "pirate"), adapter_name="pirate")
        model.add_weighted_adapter(["saved", "pirate"], [0.6, 0.8], "mix", combination_type=combination)
        for module in model.modules():
            if type(module).__name__ == "ModulesToSaveWrapper" and "saved" in module.modules_to_save:
                module.modules_to_save["mix"] = copy.deepcopy(module.modules_to_save["saved"])
        model.set_adapter("mix")
        for module in model.modules():
            if type(module).__name__ == "ModulesToSaveWrapper":
                assert module.active_adapters == ["mix"], module.active_adapters
        about = (f"add_weighted_adapter(['saved', 'pirate'], [0.6, 0.8], combination_type='{combination}'), "
                 "saved's modules_to_save copied into the result")
        write(args.out / f"saved_pirate_{combination}.json", reference(model, f"saved_pirate_{combination}", about))


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
