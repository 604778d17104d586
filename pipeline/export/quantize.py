"""int8 dynamic quantisation of an exported graph's linear layers (ONNX Runtime's quantize_dynamic).

Weights become int8 (per output channel), activations are quantised on the fly per
tensor. Only MatMuls with a constant weight are quantised (ONNX Runtime also turns
the exporter's Gemm layers into such MatMuls): attention's q.k and softmax.v
products stay fp32. tests/test_export.py checks that no float linear layer is left.
"""
from __future__ import annotations

from pathlib import Path


def quantize_int8(src: Path, dest: Path) -> None:
    """``src`` (fp32 graph) -> ``dest`` with int8 weights in its linear layers."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic advises shape-inference pre-processing, which only static quantisation needs.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
