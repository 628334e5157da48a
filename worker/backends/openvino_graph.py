"""Edits made on the converted OpenVINO IR, before anything else reads it: the same outputs, less work.

Both run in ``worker.backends.openvino._convert`` right after conversion, so the fp32, bf16 and
int8 IRs (the int8 one is built from the fp32 one) all have them; ``scheme`` names them in the
IR's cache folder, and export.json says what each did.

``fuse_projections``: the MatMuls that read one tensor with constant weights (a BERT layer's Q,
K and V, which read the same layer norm output) become one MatMul with the weights side by side
(N = 1152 for a 384-wide model) and a split of its output. The outputs are the same numbers
(checked bit-identical in fp32 on the bundled MiniLM); the CPU plugin then runs one GEMM where
it ran three, and on the int8 IR quantizes that input's activations once, not three times.
Their smoothing factors were already one per input tensor (``openvino_int8.weight_groups``).

``first_token_last_layer``: a model pooled by its first token (``cls``: bge, e5, most retrieval
BERTs) reads one row of the last layer's output, but the converted graph computes every row
there: queries, attention output, both FFN projections, layer norms. Only the last layer's keys
and values need every token (the first token attends to all of them). So the last layer's query
MatMul and its residual read the first row of the layer's input, and the attention mask its first
query row: every op after the attention runs on one row a sequence, with the same result (a
BERT layer's rows meet only in attention). Keys and values are 1/6 of a layer's linear work, so
this saves 5/6 of one layer's: ~6.9% of a 12-layer model's MACs a token, ~14% of a 6-layer
one's. Mean, max and last-token pooling read every row and are left alone. A graph whose last
layer does not look as expected (one attention op whose query is a MatMul of a tensor that also
feeds one residual Add) is left as converted, with the reason logged and recorded.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from producer.jobs import JobKind
from worker.models.resolve import ModelInfo

log = logging.getLogger(__name__)

#: Part of the IR cache key of a CLS-pooled embedding model (the last layer runs the first row only).
SCHEME = "cls1"
#: Part of every IR's cache key: the MatMuls sharing an input (Q, K, V) merged into one.
FUSED = "qkv1"


def _producer(output: Any, types: tuple[str, ...]) -> Any:
    """The op producing ``output``, walking back through ``types`` (reshapes, transposes, bias adds)."""
    node = output.get_node()
    while node.get_type_name() in types:
        node = node.input_value(0).get_node()
    return node


def _first_row(value: Any, axis: int) -> Any:
    """``value[..., 0:1, ...]`` along ``axis`` (an OpenVINO output)."""
    import openvino.opset13 as ops

    def const(x: int) -> Any:
        return ops.constant(np.array([x], np.int64))

    return ops.slice(value, const(0), const(1), const(1), const(axis)).output(0)


def first_token_last_layer(model: Any) -> str:
    """Edit ``model`` (an ``openvino.Model`` of a CLS-pooled encoder) in place so that its last
    layer computes only the first token's row. Returns "" when done, else why it was left alone."""
    attentions = [n for n in model.get_ordered_ops() if n.get_type_name() == "ScaledDotProductAttention"]
    if not attentions:
        return "no ScaledDotProductAttention op"
    attention = attentions[-1]
    query = _producer(attention.input_value(0), ("Transpose", "Reshape", "Add"))
    if query.get_type_name() != "MatMul" or query.input_value(1).get_node().get_type_name() not in ("Constant", "Convert", "Multiply"):
        return f"the last attention's query comes from a {query.get_type_name()}, not a MatMul of a weight"
    hidden = query.input_value(0)
    residuals = [target for target in hidden.get_target_inputs()
                 if target.get_node().get_type_name() == "Add" and target.get_node() is not query]
    if len(residuals) != 1:
        return f"the last layer's input feeds {len(residuals)} residual Adds, not 1"
    if attention.get_input_size() < 4 or attention.get_input_partial_shape(3).rank.get_length() != 4:
        return "the last attention has no 4-D mask"
    first = _first_row(hidden, 1)
    query.input(0).replace_source_output(first)
    residuals[0].replace_source_output(first)
    attention.input(3).replace_source_output(_first_row(attention.input_value(3), 2))
    model.validate_nodes_and_infer_types()
    return ""


def _weight(node: Any) -> Any:
    """A MatMul's second input when it is a 2-D fp32 constant, else None."""
    import openvino as ov

    source = node.input_value(1).get_node()
    if source.get_type_name() == "Constant" and source.get_element_type() == ov.Type.f32 \
            and len(source.get_output_partial_shape(0)) == 2:
        return source
    return None


def fuse_projections(model: Any) -> int:
    """Merge the MatMuls that read one tensor with constant weights of one K (a layer's Q, K and
    V) into one MatMul whose output is split back. Returns how many MatMuls were merged away."""
    import openvino.opset13 as ops

    groups: dict[tuple[str, int, bool], list[Any]] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "MatMul" or _weight(node) is None \
                or node.get_attributes().get("transpose_a", False):
            continue
        reads = node.input_value(0)
        key = (reads.get_node().get_friendly_name(), reads.get_index(),
               bool(node.get_attributes().get("transpose_b", False)))
        groups.setdefault(key, []).append(node)
    merged = 0
    for (_, _, transposed), nodes in groups.items():
        if len(nodes) < 2:
            continue
        weights = [np.asarray(_weight(n).get_data(), dtype=np.float32) for n in nodes]
        axis = 0 if transposed else 1  # the output channels: rows of [N, K], columns of [K, N]
        widths = [w.shape[axis] for w in weights]
        fused = ops.matmul(nodes[0].input_value(0), ops.constant(np.concatenate(weights, axis=axis)),
                           transpose_a=False, transpose_b=transposed)
        parts = ops.variadic_split(fused, ops.constant(np.int64(-1)), ops.constant(np.array(widths, np.int64)))
        for index, node in enumerate(nodes):
            for target in list(node.output(0).get_target_inputs()):
                target.replace_source_output(parts.output(index))
        merged += len(nodes) - 1
    model.validate_nodes_and_infer_types()
    return merged


def scheme(info: ModelInfo) -> str:
    """Part of the IR cache key: which edits ``edit`` makes for ``info``."""
    return f"{FUSED}-{SCHEME}" if _cls_pooled(info) else FUSED


def _cls_pooled(info: ModelInfo) -> bool:
    return info.kind == JobKind.embed and info.pooling == "cls"


def edit(model: Any, info: ModelInfo) -> dict[str, Any]:
    """The edits made on a freshly converted IR (in place): the last layer on the first row for a
    CLS-pooled embedding model (``first_token_last_layer``), then the shared-input projections
    merged (``fuse_projections``). Returns what was done, for the IR's export.json."""
    notes: dict[str, Any] = {}
    if _cls_pooled(info):
        skipped = first_token_last_layer(model)
        notes["last_layer_first_row"] = skipped or "yes"
        if skipped:
            log.warning("%s: the last layer runs every row (%s)", info.name, skipped)
    notes["merged_matmuls"] = fuse_projections(model)
    return notes
