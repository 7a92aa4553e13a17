#!/usr/bin/env python3
"""PEFT + torch on CPU, training LoRA with the recipe `tailor train` runs, for
the README's side-by-side (not a project dependency: run it from a venv with
`pip install torch transformers peft gguf`).

Same data (OpenAI chat JSONL, the model's chat template, only assistant
tokens learned, examples over --max-seq-len left out as tailor does), same
batches of --batch-size examples padded to the longest, AdamW, linear
warm-up then cosine to a floor. Prints one JSON line per step and a summary:
train tokens/s (tokens excluding padding, steps after the first two) and
peak RSS.

    python scripts/bench-train-peft.py --gguf MODEL.gguf --data pirate.jsonl \
        --threads 2 --rank 8 --alpha 16 --target-modules q_proj,v_proj --steps 12
"""
import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--target-modules", default="q_proj,v_proj")
    p.add_argument("--use-rslora", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--schedule-steps", type=int, default=160)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--max-seq-len", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.target_modules.split(","),
                        use_rslora=args.use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()

    examples, too_long = [], 0
    for line in open(args.data):
        messages = json.loads(line)["messages"]
        ids, labels = [], []
        # Each assistant turn is learned; the text before it is context.
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            a = tokenizer(before, add_special_tokens=False)["input_ids"]
            b = tokenizer(through, add_special_tokens=False)["input_ids"]
            labels = [-100] * len(a) + b[len(a):]
            ids = b
        if len(ids) > args.max_seq_len:
            too_long += 1
            continue
        examples.append((ids, labels))

    rng = random.Random(args.seed)
    order = []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def rate(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.schedule_steps - args.warmup))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    speeds = []
    for step in range(args.steps):
        if len(order) < args.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        picked = [examples[i] for i in order[: args.batch_size]]
        del order[: args.batch_size]
        longest = max(len(ids) for ids, _ in picked)
        pad = tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (longest - len(ids)) for ids, _ in picked])
        attention = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids, _ in picked])
        labels = torch.tensor([lab + [-100] * (longest - len(lab)) for _, lab in picked])
        tokens = sum(len(ids) for ids, _ in picked)
        started = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        if step >= 2:
            speeds.append(tokens / seconds)
        print(json.dumps({"step": step + 1, "loss": round(loss.item(), 4), "tokens": tokens,
                          "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1)}), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"summary": True, "examples": len(examples), "too_long": too_long,
                      "median_tokens_per_second": round(statistics.median(speeds), 1) if speeds else None,
                      "peak_rss_mb": round(peak_mb), "threads": args.threads, "torch": torch.__version__}))


if __name__ == "__main__":
    sys.exit(main())
