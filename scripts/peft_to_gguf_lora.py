#!/usr/bin/env python3
"""Converts a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors)
for a llama-architecture base into llama.cpp's GGUF LoRA format, so the same
adapters can be served by llama-server for side-by-side benchmarks.

Usage: scripts/peft_to_gguf_lora.py ADAPTER_DIR OUT.gguf --heads 9 --kv-heads 3
Needs: pip install gguf numpy safetensors

llama.cpp stores q/k projection rows permuted for its adjacent-pair rotary
layout, so lora_B of q_proj/k_proj is permuted the same way; rsLoRA's scale
alpha/sqrt(r) is expressed as llama.cpp's alpha/r with alpha' = alpha*sqrt(r).
"""

import argparse
import json
import math
import re
import sys
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NAME = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")


def permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--heads", type=int, required=True)
    parser.add_argument("--kv-heads", type=int, required=True)
    args = parser.parse_args()
    config = json.loads((args.adapter_dir / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        sys.exit("rank_pattern/alpha_pattern adapters need per-tensor alphas; not supported by this converter")
    r, alpha = config["r"], float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha = alpha * math.sqrt(r)
    tensors = load_file(str(args.adapter_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(args.out), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for name in sorted(tensors):
        match = NAME.fullmatch(name)
        if not match:
            sys.exit(f"unexpected tensor {name}")
        layer, module, kind = match.groups()
        data = tensors[name].astype(np.float32)
        if kind == "B" and module == "self_attn.q_proj":
            data = permute(data, args.heads)
        elif kind == "B" and module == "self_attn.k_proj":
            data = permute(data, args.kv_heads)
        writer.add_tensor(f"blk.{layer}.{MODULES[module]}.weight.lora_{kind.lower()}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
