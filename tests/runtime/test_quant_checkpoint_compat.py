"""A `moeplan quantize` checkpoint is a compressed-tensors checkpoint: the library's own config model
accepts its quantization_config, and its own compressors decompress every expert matrix to exactly what
moeplan dequantizes (in float16, the scales' dtype, which is what the library decompresses into)."""
from __future__ import annotations

import json

import pytest
import torch

from runtime.quant_format import dequantize
from runtime.quantize import quantize_checkpoint

compressed_tensors = pytest.importorskip("compressed_tensors")  # in the `test` extra


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_compressed_tensors_reads_what_moeplan_writes(fmt, checkpoint, tmp_path):
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    from safetensors import safe_open

    folder, _ = checkpoint("mixtral")
    out = tmp_path / fmt
    quantize_checkpoint(folder, out, fmt, 32, progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == {"int4": "pack-quantized", "int8": "int-quantized"}[fmt]
    group = qc["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    compressor = BaseCompressor.get_value_from_registry(qc["format"])
    checked = 0
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        for key in keys:
            if not key.endswith(".weight_scale"):
                continue
            base = key[:-len("weight_scale")]
            parts = {k[len(base):]: handle.get_tensor(k) for k in keys if k.startswith(base)}
            theirs = compressor.decompress(parts, scheme)["weight"]
            q = parts["weight_packed"].view(torch.uint8) if fmt == "int4" else parts["weight"]
            assert torch.equal(theirs, dequantize(q, parts["weight_scale"], fmt, torch.float16)), base
            checked += 1
    assert checked == 3 * 8 * 3  # layers x experts x matrices
