"""int8 for an OpenVINO IR: weights int8 per output channel, activations quantized per token at
run time by the CPU plugin (its dynamic quantization), on CPUs with int8 dot products.

Why this scheme: static int8 (NNCF's FakeQuantize) fixes one activation scale per tensor from a
calibration set, and BERT-style encoders have a few channels of large activations, so it loses
the quality rule (recall@10 vs fp32 0.92 on the bundled MiniLM: bench/RESULTS-cpu.md). Here
every MatMul with a constant weight gets its weight as ``Constant(i8) -> Convert -> Multiply(scale
per output channel)``, the decompression pattern the CPU plugin compiles into a FullyConnected
with int8 weights, and the plugin's ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` = ``ACTIVATION_GROUP``
makes it quantize each token's activations in groups of that many channels of K, then run int8
dot products (VNNI ``vpdpbusd`` on AVX-512-VNNI/AVX-VNNI, AMX tiles on Xeons with AMX).

Where the CPU has no int8 dot products (plain AVX2) the plugin decompresses such weights to fp32
and skips the activation quantization: fp32's speed with int8's error (measured on a Zen 3), so
the backend refuses int8 there (``int8_native``) rather than running quality lost for nothing.

Measured on the 2-core Zen 4 (avx512_vnni, avx512_bf16), bundled MiniLM, 1,000 corpus texts:
recall@10 vs fp32 0.978, min cosine 0.9975 (groups of 32; 128 gave 0.972, too near the rule's
0.97), at about 1.2x the plugin's bf16 (bench/RESULTS-cpu.md).
"""

from __future__ import annotations

import numpy as np

#: Channels of K per activation scale (per token). 32 kept recall@10 0.978 on MiniLM; 128 0.972.
ACTIVATION_GROUP = 32
#: Part of the IR cache key: what the weights are (symmetric int8, one scale per output channel).
WEIGHT_SCHEME = "i8ch"
#: CPU flags of int8 dot-product units the plugin's dynamic quantization runs on.
INT8_UNITS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_native() -> bool:
    """Whether this CPU has int8 dot products (VNNI or AMX), which the int8 path needs to pay."""
    from worker.backends.torch_cpu import cpu_flags

    return bool(set(INT8_UNITS) & cpu_flags())


def quantize_channels(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` fp32 -> (int8 ``[N, K]``, fp32 scales ``[N, 1]``): symmetric, max|w| / 127 per row."""
    scales = np.maximum(np.abs(weight).max(axis=1, keepdims=True), np.float32(1e-12)) / np.float32(127.0)
    quantized = np.clip(np.rint(weight / scales), -127, 127).astype(np.int8)
    return quantized, scales.astype(np.float32)


def compress_weights(model: object) -> int:
    """Rewrite ``model`` (an ``openvino.Model``) in place: every MatMul whose second input is a 2-D
    fp32 constant takes it as int8 per output channel; returns how many (0 is refused)."""
    import openvino as ov
    import openvino.opset13 as ops

    replaced = 0
    for node in model.get_ordered_ops():  # type: ignore[attr-defined]
        if node.get_type_name() != "MatMul":
            continue
        source = node.input_value(1).get_node()
        if source.get_type_name() != "Constant" or source.get_element_type() != ov.Type.f32:
            continue
        weight = source.get_data()
        if weight.ndim != 2:
            continue
        transposed = bool(node.get_attributes().get("transpose_b", False))
        rows = np.asarray(weight if transposed else weight.T, dtype=np.float32)  # [N, K]: one row per output
        quantized, scales = quantize_channels(rows)
        restored = ops.multiply(ops.convert(ops.constant(quantized), ov.Type.f32), ops.constant(scales))
        if not transposed:
            restored = ops.transpose(restored, ops.constant(np.array([1, 0], np.int64)))
        node.input(1).replace_source_output(restored.output(0))
        replaced += 1
    if not replaced:
        raise ValueError("the model has no MatMul with a constant fp32 weight to quantize")
    return replaced
