"""int8 with per-token activation scales for an exported ONNX graph (ONNX Runtime's MatMulNBits).

Why not ONNX Runtime's ``quantize_dynamic``: it quantizes each MatMul's activations with one
scale for the whole batch, so one outlier token (BERT-style encoders have a few channels of large
activations) flattens every other token's resolution; on the bundled MiniLM that loses the
quality rule (recall@10 vs fp32 0.91-0.92). Here every MatMul whose weight is a constant becomes
a ``com.microsoft.MatMulNBits`` of 8 bits with ``accuracy_level`` 4: its weights are int8 per
output channel in blocks of ``BLOCK`` along K (symmetric, one fp32 scale per block), and ONNX
Runtime quantizes the activations at run time per row (token) and per block of K, then runs
int8 dot products (MLAS: VNNI/AMX where the CPU has them, AVX2 ``vpmaddubsw`` otherwise). The
fused attention's Q/K/V projection (inside the ``Attention`` op) stays fp32.

Written here rather than through onnxruntime.quantization's MatMulNBitsQuantizer because that
one needs onnx_ir, an extra dependency, for about forty lines of numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Block of K sharing one weight scale and one activation scale (per row). 32 measured the best
#: quality of 32/128 on the bundled model (bench/RESULTS-cpu.md).
BLOCK = 32
#: MatMulNBits accuracy_level 4: int8 activations, int32 accumulation.
ACCURACY_LEVEL = 4


def quantize_weight(weight: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` fp32 -> (uint8 ``[N, blocks, block]`` centred on 128, fp32 scales ``[N * blocks]``).

    Symmetric per (output channel, block of K): scale = max|w| / 127; K is zero-padded to a
    whole number of blocks (the padding multiplies zeros)."""
    k, n = weight.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = weight
    grouped = padded.T.reshape(n, blocks, block)
    scales = np.maximum(np.abs(grouped).max(axis=2), np.float32(1e-12)) / np.float32(127.0)
    quantized = np.clip(np.rint(grouped / scales[..., None]), -127, 127).astype(np.int16) + 128
    return quantized.astype(np.uint8), scales.reshape(-1).astype(np.float32)


def dequantize_weight(quantized: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The ``[K, N]`` fp32 weight a quantized one stands for (what the tests compare)."""
    n, blocks, block = quantized.shape
    values = (quantized.astype(np.float32) - 128.0) * scales.reshape(n, blocks, 1)
    return values.reshape(n, blocks * block)[:, :k].T


def quantize_model(src: Path, dest: Path, block: int = BLOCK) -> int:
    """Write ``src`` with every constant-weight fp32 MatMul as an 8-bit MatMulNBits to ``dest``;
    returns how many were replaced (0 is refused: the graph has no such MatMul)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    made: dict[str, tuple[str, str, int, int]] = {}
    nodes = []
    for node in graph.node:
        source = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if source is None or source.data_type != onnx.TensorProto.FLOAT or len(source.dims) != 2:
            nodes.append(node)
            continue
        if source.name not in made:
            weight = numpy_helper.to_array(source)
            quantized, scales = quantize_weight(weight, block)
            names = (f"{source.name}_q8", f"{source.name}_q8_scales")
            graph.initializer.extend([numpy_helper.from_array(quantized, names[0]),
                                      numpy_helper.from_array(scales, names[1])])
            made[source.name] = (*names, *weight.shape)
        q_name, s_name, k, n = made[source.name]
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], q_name, s_name], list(node.output),
                                      name=f"{node.name}_q8", domain="com.microsoft", K=k, N=n, bits=8,
                                      block_size=block, accuracy_level=ACCURACY_LEVEL))
    if not made:
        raise ValueError(f"{src} has no MatMul with a constant fp32 weight to quantize")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dest))
    return len(made)
