"""Writes the fuzz targets' seed inputs into fuzz/corpus/ (kept in git, so
each CI run starts from them): a tiny Llama GGUF (float32, float16 and Q8_0
tensors), a PEFT adapter for the targets' tiny base, tokenizer texts, and
chat and named templates from this repository.

usage: python fuzz/make_seeds.py   (needs gguf, safetensors, numpy)
"""

import json
import pathlib

import gguf
import numpy as np
from safetensors.numpy import save

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
rng = np.random.default_rng(7)

# A Llama the shape of `RandomSource::tiny_config(64)`, one layer.
hidden, ff, heads, kv_heads, vocab = 64, 128, 4, 2, 64
head_dim = hidden // heads
# (No .gguf ending: the repository ignores model files by it.)
writer = gguf.GGUFWriter(str(CORPUS / "gguf" / "tiny-llama"), "llama")
writer.add_block_count(1)
writer.add_context_length(128)
writer.add_embedding_length(hidden)
writer.add_feed_forward_length(ff)
writer.add_head_count(heads)
writer.add_head_count_kv(kv_heads)
writer.add_layer_norm_rms_eps(1e-5)
writer.add_rope_freq_base(10000.0)
tensors = {
    "token_embd.weight": (vocab, hidden),
    "output_norm.weight": (hidden,),
    "blk.0.attn_norm.weight": (hidden,),
    "blk.0.ffn_norm.weight": (hidden,),
    "blk.0.attn_q.weight": (hidden, hidden),
    "blk.0.attn_k.weight": (kv_heads * head_dim, hidden),
    "blk.0.attn_v.weight": (kv_heads * head_dim, hidden),
    "blk.0.attn_output.weight": (hidden, hidden),
    "blk.0.ffn_gate.weight": (ff, hidden),
    "blk.0.ffn_up.weight": (ff, hidden),
    "blk.0.ffn_down.weight": (hidden, ff),
}
for i, (name, shape) in enumerate(tensors.items()):
    data = rng.standard_normal(shape).astype(np.float32) * 0.1
    if len(shape) == 2 and i % 3 == 1:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif len(shape) == 2 and i % 3 == 2:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, data)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()

# adapter_config.json, a NUL, then adapter_model.safetensors (rank 4 on q and v).
config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "base_model_name_or_path": "tiny"}
weights = {}
for layer in range(2):
    for module, out in (("q_proj", hidden), ("v_proj", kv_heads * head_dim)):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
        weights[f"{prefix}.lora_A.weight"] = rng.standard_normal((4, hidden)).astype(np.float32)
        weights[f"{prefix}.lora_B.weight"] = rng.standard_normal((out, 4)).astype(np.float32)
(CORPUS / "adapter" / "q-v-rank4").write_bytes(json.dumps(config).encode() + b"\0" + save(weights))

texts = {
    "plain": "Hello, world! What is the capital of France?",
    "chat": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "unicode": "naïve café — 東京 🚀 \u200b\t\r\n  spaces",
    "code": "def f(x):\n    return x ** 2  # squares\n",
}
for name, text in texts.items():
    (CORPUS / "tokenizer" / name).write_text(text)

sources = [ROOT / "tests/fixtures/smollm2/chat_template.jinja"]
sources += sorted((ROOT / "templates").glob("*.jinja"))
for path in sources:
    if path.exists():
        (CORPUS / "template" / path.name).write_text(path.read_text())
print("seeds written to", CORPUS)
