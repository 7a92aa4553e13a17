"""Rewrites a float16/float32 GGUF with its matrices in Q4_1 or Q8_0 (norms and
other 1-D tensors stay as they are), for benchmarks on a model that exists only
as a float file, e.g. the 1.24 B random model of ../shared/tools/make_big_random.py,
on a machine without llama.cpp's llama-quantize. Plain round-to-nearest blocks
(gguf-py's own quantizers), no importance matrix: speed does not depend on it.

usage: gguf-requantize.py IN.gguf OUT.gguf [Q4_1|Q8_0]
Needs numpy and gguf (pip install numpy gguf).
"""
import sys

import numpy as np
import gguf
from gguf import quants


def main():
    src_path, out_path = sys.argv[1], sys.argv[2]
    target = gguf.GGMLQuantizationType[sys.argv[3] if len(sys.argv) > 3 else "Q4_1"]
    file_type = {
        gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
        gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    }[target]
    src = gguf.GGUFReader(src_path)
    arch = src.fields["general.architecture"].contents()
    out = gguf.GGUFWriter(out_path, arch)
    for name, field in src.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        value = field.contents()
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        out.add_key_value(name, value, kind, sub_type=sub)
    out.add_file_type(file_type)
    block = gguf.GGML_QUANT_SIZES[target][0]
    for t in src.tensors:
        # GGUF lists dimensions innermost first; numpy's shape is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        data = np.asarray(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32) and len(shape) == 2 \
                and shape[-1] % block == 0:
            q = quants.quantize(data.astype(np.float32).reshape(shape), target)
            out.add_tensor(t.name, q, raw_dtype=target)
        else:
            out.add_tensor(t.name, data.reshape(shape), raw_dtype=t.tensor_type)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


if __name__ == "__main__":
    main()
