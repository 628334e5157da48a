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

SmoothQuant-style scaling (``smooth``), before the weights are quantized: most of int8's error
on MiniLM is the weights' (int8 weights with the activations left in bf16 lose as much recall as
both together), and it comes from the few input channels whose activations are large (LayerNorm
outlier dimensions, GELU outputs): an error in their weights is multiplied by them. Each group of
MatMuls that reads one tensor gets a per-input-channel factor ``s = max|x|^alpha / max|w|^(1-alpha)``
(``alpha`` = ``SMOOTHING_ALPHA``; ``max|x|`` over calibration prose, ``max|w|`` over the group's
weight columns): the weights are quantized as ``W * s`` and the input is multiplied by ``1 / s``
(one Multiply per group, exact in real arithmetic), so the large channels' weights get more of
each row's int8 range and the activations become flatter for the per-token scales. The factors
are computed once, when the int8 IR is built (``worker.backends.openvino._quantize``), on
paragraphs of CPython's own documentation that the quality rule does not measure on.

Measured on the 2-core Zen 4 (avx512_vnni, avx512_bf16), bundled MiniLM, 1,000 corpus texts,
recall@10 vs fp32 / min cosine: without smoothing, groups of 32: 0.978 / 0.9975 (stop 26's
default), groups of 128: 0.971 / 0.9947; with smoothing (alpha 0.5, 512 calibration paragraphs), groups of
32: 0.981 / 0.9989, groups of 128: 0.980 / 0.9982 (256 paragraphs: 0.978 at 128; alpha 0.25: 0.973,
0.65: 0.973, 0.8: 0.967, all at 128). Groups of 128 rescale the int32 accumulators a quarter as often
(bench/RESULTS-cpu.md has the speeds). A group size of 2**32-1 ("per token") leaves the
activations unquantized on OpenVINO 2026.4 (outputs identical to group 0), so it is not used.

Sensitive MatMuls kept in bf16 (``sensitive_roles``, ``CALIBRATION_RECALL``): where the all-int8
IR loses recall@10 against fp32 on the calibration paragraphs, the MatMul *roles* that lose it
(Q/K/V, attention output, FFN up, FFN down: ``role``, one decision for every layer) keep their
weights in fp32 and run in bf16, chosen greedily by recall gained per weight kept, each choice
measured on the calibration paragraphs against the fp32 IR. On the bundled MiniLM the all-int8
IR keeps 0.980 there and nothing is kept; on the bge-small architecture with random weights
(0.934 all-int8: its activations, not its weights, lose it; int8 weights with fp32 activations
keep 0.990) the FFN's down and up projections and the attention output are kept (0.978), Q/K/V
int8. Whether such an IR is worth running is the auto selection's call: it times it against bf16
under the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

#: Channels of K per activation scale (per token). With smoothing, 128 kept recall@10 0.980 on MiniLM.
ACTIVATION_GROUP = 128
#: SmoothQuant's migration strength: 0 leaves the weights alone, 1 moves all of the activations' range into them.
SMOOTHING_ALPHA = 0.5
#: Calibration paragraphs for the smoothing factors, taken after the ones the quality rule measures on.
CALIBRATION_TEXTS = 512
#: recall@10 against fp32 on the calibration prose the int8 IR must keep (the rule's is 0.97 on
#: other prose): below it, ``sensitive_roles`` keeps the MatMul roles that lose it in bf16.
CALIBRATION_RECALL = 0.975
#: MatMuls with fewer output channels than this keep their fp32 weights (heads: ``constant_matmuls``).
MIN_CHANNELS = 16
#: CPU flags of int8 dot-product units the plugin's dynamic quantization runs on.
INT8_UNITS = ("avx512_vnni", "avx_vnni", "amx_int8")


def weight_scheme() -> str:
    """Part of the IR cache key: what the weights are (symmetric int8, one scale per output
    channel, smoothed with ``SMOOTHING_ALPHA`` on ``CALIBRATION_TEXTS`` paragraphs, the roles
    that lose ``CALIBRATION_RECALL`` kept in bf16, which depends on the ``ACTIVATION_GROUP`` the
    calibration ran with, and heads under ``MIN_CHANNELS`` left alone)."""
    return (f"i8ch-sq{round(SMOOTHING_ALPHA * 100)}c{CALIBRATION_TEXTS}"
            f"-keep{round(CALIBRATION_RECALL * 1000)}g{ACTIVATION_GROUP}n{MIN_CHANNELS}")


def int8_native() -> bool:
    """Whether this CPU has int8 dot products (VNNI or AMX), which the int8 path needs to pay."""
    from worker.backends.torch_cpu import cpu_flags

    return bool(set(INT8_UNITS) & cpu_flags())


def quantize_channels(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` fp32 -> (int8 ``[N, K]``, fp32 scales ``[N, 1]``): symmetric, max|w| / 127 per row."""
    scales = np.maximum(np.abs(weight).max(axis=1, keepdims=True), np.float32(1e-12)) / np.float32(127.0)
    quantized = np.clip(np.rint(weight / scales), -127, 127).astype(np.int8)
    return quantized, scales.astype(np.float32)


def constant_matmuls(model: object) -> list[object]:
    """The MatMuls of ``model`` (an ``openvino.Model``) whose second input is a 2-D fp32 constant
    with at least ``MIN_CHANNELS`` output channels: the weights that are quantized (and smoothed).
    Smaller ones (a reranker's or classifier's head) stay as they are: they cost nothing, and on
    OpenVINO 2026.4 a 1-channel int8 head run on two streams returned -77.7 for fp32's -0.015
    (the tiny reranker, ``test_a_reranker_int8_ir_...``), while one stream was right."""
    import openvino as ov

    found = []
    for node in model.get_ordered_ops():  # type: ignore[attr-defined]
        if node.get_type_name() != "MatMul":
            continue
        source = node.input_value(1).get_node()
        if source.get_type_name() == "Constant" and source.get_element_type() == ov.Type.f32 \
                and len(source.get_output_partial_shape(0)) == 2 and _shape(node)[0] >= MIN_CHANNELS:
            found.append(node)
    return found


def weight_groups(model: object) -> list[list[object]]:
    """The MatMuls with a 2-D fp32 constant weight, grouped by the tensor they read (Q, K and V
    read one LayerNorm output): a group shares one smoothing factor, so one Multiply serves it."""
    groups: dict[tuple[str, int], list[object]] = {}
    for node in constant_matmuls(model):
        reads = node.input_value(0)  # type: ignore[attr-defined]
        groups.setdefault((reads.get_node().get_friendly_name(), reads.get_index()), []).append(node)
    return list(groups.values())


def _rows(node: object) -> np.ndarray:
    """A MatMul's constant weight as ``[N, K]`` (one row per output channel)."""
    weight = np.asarray(node.input_value(1).get_node().get_data(), dtype=np.float32)  # type: ignore[attr-defined]
    return weight if node.get_attributes().get("transpose_b", False) else weight.T  # type: ignore[attr-defined]


def _shape(node: object) -> tuple[int, int]:
    """A MatMul's constant weight's ``(N, K)``, from its shape (no data read)."""
    dims = [int(d) for d in node.input_value(1).get_shape()]  # type: ignore[attr-defined]
    return (dims[0], dims[1]) if node.get_attributes().get("transpose_b", False) else (dims[1], dims[0])  # type: ignore[attr-defined]


def role(node: object) -> str:
    """What a MatMul is in its layer, the same in every layer: its weight's ``N x K`` and the op
    its input comes from (a BERT layer: Q/K/V ``384x384<-MVN``, the attention output
    ``384x384<-Reshape``, the FFN's up ``1536x384<-MVN`` and down ``384x1536<-Gelu``). Roles are
    what ``keep`` keeps in bf16: one decision for all layers, from one calibration run each."""
    n, k = _shape(node)
    source = node.input_value(0).get_node()  # type: ignore[attr-defined]
    while source.get_type_name() == "Multiply" and source.input_value(1).get_node().get_type_name() == "Constant":
        source = source.input_value(0).get_node()  # the smoothing's own Multiply is not the role
    return f"{n}x{k}<-{source.get_type_name()}"


def roles(model: object) -> dict[str, int]:
    """Each ``role`` of ``model``'s constant-weight MatMuls with its weights' size (N*K summed over
    its MatMuls: its share of the int8 work per token)."""
    found: dict[str, int] = {}
    for node in constant_matmuls(model):
        n, k = _shape(node)
        name = role(node)
        found[name] = found.get(name, 0) + n * k
    return found


def sensitive_roles(evaluate: Callable[[frozenset[str]], float], sizes: dict[str, int],
                    target: float | None = None) -> tuple[frozenset[str], list[tuple[frozenset[str], float]]]:
    """The roles to keep in bf16 so that ``evaluate(kept)`` (recall@10 against fp32 on the
    calibration prose, every other role int8) reaches ``target`` (``CALIBRATION_RECALL``): none
    if the all-int8 IR does; else, greedily, the role whose keeping gains the most recall per
    weight kept, one at a time, until the target is met or a single role is left int8 (past
    that the IR is bf16 with extra steps, and the auto selection's gate and timing decide).
    Returns the kept roles and every (kept, recall) evaluated, in order."""
    target = CALIBRATION_RECALL if target is None else target
    kept: frozenset[str] = frozenset()
    tried = [(kept, evaluate(kept))]
    recall = tried[0][1]
    while recall < target and len(sizes) - len(kept) > 1:
        options = []
        for name in sorted(set(sizes) - kept):
            candidate = kept | {name}
            tried.append((candidate, evaluate(candidate)))
            options.append(((tried[-1][1] - recall) / sizes[name], tried[-1][1], candidate))
        _, recall, kept = max(options, key=lambda option: option[:2])
    return kept, tried


def smoothing_factors(input_max: np.ndarray, rows: list[np.ndarray], alpha: float | None = None) -> np.ndarray:
    """Per input channel: ``max|x|^alpha / max|w|^(1-alpha)`` over the group's weight columns,
    divided by its geometric mean (the overall scale is the per-row int8 scale's business);
    ``alpha`` defaults to ``SMOOTHING_ALPHA``."""
    alpha = SMOOTHING_ALPHA if alpha is None else alpha
    weight_max = np.max([np.abs(r).max(axis=0) for r in rows], axis=0)
    factors = (np.power(np.maximum(input_max, 1e-5), alpha)
               / np.power(np.maximum(weight_max, 1e-5), 1.0 - alpha)).astype(np.float64)
    return (factors / np.exp(np.log(factors).mean())).astype(np.float32)


def calibrate(model: object, feeds: list[dict[str, np.ndarray]],
              masks: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """For each of ``weight_groups(model)``: max|x| per input channel over the real tokens of
    ``feeds``; and the model's first output on them, rows in feed order (the fp32 reference of
    ``sensitive_roles``). One fp32 run of a copy of ``model`` with those inputs added as outputs."""
    import openvino as ov

    probe = model.clone()  # type: ignore[attr-defined]
    groups = weight_groups(probe)
    probe.add_outputs([group[0].input_value(0) for group in groups])
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    ranges = [np.zeros(0, np.float32) for _ in groups]
    first = len(model.outputs)  # type: ignore[attr-defined]
    outputs = []
    for feed, mask in zip(feeds, masks):
        request.infer(feed)
        outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32))
        real = mask.astype(bool)
        for index in range(len(groups)):
            values = request.get_output_tensor(first + index).data
            # a [B, T, C] input's real tokens; the first-row input of a CLS model's last layer
            # (``openvino_graph``) is [B, 1, C]: its one row is the first token, always real
            values = values[real[:, :values.shape[1]]] if values.ndim == 3 else values.reshape(-1, values.shape[-1])
            peak = np.abs(values).max(axis=0)
            ranges[index] = peak if not ranges[index].size else np.maximum(ranges[index], peak)
    return ranges, np.concatenate(outputs)


def outputs(model: object, feeds: list[dict[str, np.ndarray]], config: dict[str, object]) -> np.ndarray:
    """``model``'s first output on ``feeds`` (rows in feed order), compiled with ``config``."""
    import openvino as ov

    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return np.concatenate([np.array(request.infer(feed)[0], dtype=np.float32) for feed in feeds])


def rewrite_weights(model: object, ranges: list[np.ndarray] | None = None, keep: Collection[str] = (),
                    alpha: float | None = None) -> int:
    """Rewrite ``model`` (an ``openvino.Model``) in place, one pass over its weights: with
    ``ranges`` (one per ``weight_groups`` entry, in its order) each group reads its input times
    ``1 / s`` and its weights' columns are multiplied by ``s`` (``smoothing_factors``); then every
    MatMul whose ``role`` is not in ``keep`` takes its weight as int8 per output channel, and the
    kept ones keep theirs in fp32 (the plugin runs them in bf16 or fp32). Each weight is read
    once. Returns how many MatMuls are int8; a model without such MatMuls is refused."""
    import openvino as ov
    import openvino.opset13 as ops

    groups = weight_groups(model)
    if not groups:
        raise ValueError("the model has no MatMul with a constant fp32 weight to quantize")
    if ranges is not None and len(groups) != len(ranges):
        raise ValueError(f"{len(ranges)} input ranges for {len(groups)} weight groups")
    quantized_count = 0
    for index, group in enumerate(groups):
        rows = [_rows(node) for node in group]
        if ranges is not None:
            factors = smoothing_factors(ranges[index], rows, alpha)
            scaled = ops.multiply(group[0].input_value(0), ops.constant((1.0 / factors).astype(np.float32)))
            rows = [r * factors[None, :] for r in rows]
        for node, weight in zip(group, rows):
            transposed = bool(node.get_attributes().get("transpose_b", False))  # type: ignore[attr-defined]
            if role(node) in keep:
                restored = ops.constant((weight if transposed else weight.T).astype(np.float32))
            else:
                quantized, scales = quantize_channels(weight)
                restored = ops.multiply(ops.convert(ops.constant(quantized), ov.Type.f32), ops.constant(scales))
                if not transposed:  # the rows are [N, K]; this MatMul reads [K, N]
                    restored = ops.transpose(restored, ops.constant(np.array([1, 0], np.int64)))
                quantized_count += 1
            node.input(1).replace_source_output(restored.output(0))  # type: ignore[attr-defined]
            if ranges is not None:
                node.input(0).replace_source_output(scaled.output(0))  # type: ignore[attr-defined]
    return quantized_count
