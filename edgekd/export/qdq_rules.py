"""Does a Q/DQ ONNX graph follow TensorRT's explicit-quantization rules? Names every node that breaks one.

TensorRT builds INT8 from QuantizeLinear/DequantizeLinear pairs when: the opset is 13 or later; zero points
are 0 (symmetric) and the quantized type is signed INT8; weight scales are per channel; and each
QuantizeLinear feeds its own DequantizeLinear (no sharing).

Per channel means: one scale per channel of the weight's channel axis, and the Q/DQ `axis` attribute equal
to that axis. The axis depends on the op and on the weight's layout:

- Conv, weight [M, C/g, kH, kW]: axis 0, the output channels.
- ConvTranspose, weight [C, M/g, kH, kW]: axis 0, the *input* channels. TensorRT's deconvolution kernels
  take per-input-channel scales and do not support per-output-channel (axis 1) ones (NVIDIA/TensorRT#2380,
  #1694; NVIDIA's pytorch-quantization and Model Optimizer quantize ConvTranspose weights on axis 0).
  ONNX Runtime's quantizer picks axis 1 for ConvTranspose, which this check reports.
- Gemm: B is [N, K] with transB=1 (axis 0) and [K, N] with transB=0 (axis 1): the output channels.
- MatMul with a constant 2-D weight [K, N]: axis 1, the output columns. MatMul between two activations has
  no weight and is not checked here.

ONNX's QuantizeLinear without a zero point produces uint8 (its default), not int8: such a node is reported.
A DequantizeLinear without one takes its input's type: fine on int8 weights, reported on uint8.

A weighted op whose weight has no DequantizeLinear is a float layer, not a broken rule: in explicit quantization
TensorRT performs only the precision conversions the Q/DQ nodes dictate, so such a layer runs in floating point
(FP32, or FP16 where the network says so), as NVIDIA's Model Optimizer leaves its excluded layers. The report lists
them (`float_layers`) so a mostly-INT8 model says which of its layers are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> input index of the weight


@dataclass
class QdqReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    quantized_weights: int = 0
    activation_pairs: int = 0
    float_layers: list[str] = field(default_factory=list)  # weighted ops TensorRT will run in floating point

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "quantized_weights": self.quantized_weights,
                "activation_pairs": self.activation_pairs, "float_layers": self.float_layers}


def _attr(node, name: str, default):
    import onnx

    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def graph_links(graph) -> tuple[dict, dict[str, list]]:
    """An ONNX graph's producer of each tensor and the consumers of each tensor."""
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def weight_channel_axis(node, rank: int) -> tuple[int | None, str]:
    """The weight axis TensorRT quantizes per channel for this node, and why; None where it has none."""
    if node.op_type == "Conv":
        return 0, "a Conv weight is [M, C/g, kH, kW]: output channels on axis 0"
    if node.op_type == "ConvTranspose":
        return 0, ("a ConvTranspose weight is [C, M/g, kH, kW] and TensorRT's deconvolution takes "
                   "per-input-channel scales on axis 0, not per-output-channel ones on axis 1")
    if node.op_type == "Gemm":
        if _attr(node, "transB", 0):
            return 0, "Gemm with transB=1 has B [N, K]: output channels on axis 0"
        return 1, "Gemm with transB=0 has B [K, N]: output channels are its columns, axis 1"
    if node.op_type == "MatMul":
        if rank != 2:
            return None, (f"a MatMul weight of rank {rank}: TensorRT quantizes MatMul weights per channel "
                          "only in 2-D")
        return 1, "a MatMul weight is [K, N]: output channels are its columns, axis 1"
    return None, ""


def _constants(graph) -> dict[str, np.ndarray]:
    """Initializers, plus Constant nodes and Identity/Cast of constants: exporters hand weights and zero points
    through them, and the checks below must see those as constants too. One pass: nodes are in order."""
    import onnx
    from onnx import TensorProto, numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
        elif node.op_type == "Cast" and node.input[0] in inits:  # pytorch-quantization's int8 zero points
            to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to", TensorProto.FLOAT))
            inits[node.output[0]] = inits[node.input[0]].astype(to)
    return inits


def _elem_types(graph) -> dict[str, int]:
    """The declared element type of each typed tensor: what a Q/DQ without a zero point has left to go by."""
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in (*graph.input, *graph.value_info, *graph.output)
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}


def _quantized_dtype(n, inits, producers, elem_types) -> np.dtype | None:
    """The integer type a QuantizeLinear makes or a DequantizeLinear reads; None if it can't be told."""
    import onnx

    zp_name = n.input[2] if len(n.input) > 2 else ""
    if zp_name and zp_name in inits:
        return inits[zp_name].dtype
    if n.op_type == "QuantizeLinear":
        out = _attr(n, "output_dtype", 0)  # opset 21+; without it or a zero point, the type is uint8
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(out)) if out else np.dtype(np.uint8)
    x = n.input[0]
    if x in inits:
        return inits[x].dtype
    if x in producers and producers[x].op_type == "QuantizeLinear":
        return _quantized_dtype(producers[x], inits, producers, elem_types)
    if x in elem_types:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_types[x]))
    return None


def _graph_problems(model, qnodes: list) -> list[str]:
    """Problems of the graph as a whole, before any node's."""
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel Q/DQ needs opset 13 or later (export with a newer "
                        "opset)")
    if not qnodes:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: this is not an explicitly quantized graph")
    return problems


def _zero_point_problems(n, inits, producers, elem_types) -> list[str]:
    """A Q/DQ node's zero point against TensorRT's signed, symmetric INT8. A missing zero point is judged by the
    type it leaves the node with, since ONNX's default for QuantizeLinear is uint8."""
    problems = []
    zp_name = n.input[2] if len(n.input) > 2 else ""
    zp = inits.get(zp_name) if zp_name else None
    if zp is not None:
        if zp.dtype == np.int32:
            problems.append(f"{n.op_type} '{n.name}': an int32 (bias) Q/DQ; TensorRT takes float biases "
                            "(quantize without bias quantization)")
        elif zp.dtype != np.int8:
            problems.append(f"{n.op_type} '{n.name}': zero point is {zp.dtype}, TensorRT needs int8 (use "
                            "symmetric S8 activations: the `trt` preset)")
        if np.any(zp != 0):
            problems.append(f"{n.op_type} '{n.name}': zero point {zp.ravel()[:4].tolist()} is not 0 "
                            "(TensorRT supports symmetric quantization only)")
    elif not zp_name:
        dtype = _quantized_dtype(n, inits, producers, elem_types)
        if dtype is None:
            problems.append(f"{n.op_type} '{n.name}': no zero point and its input type is unknown; "
                            "TensorRT needs int8 (add an int8 zero point of 0)")
        elif dtype != np.int8:
            why = ("defaults to uint8 (ONNX QuantizeLinear's default output type)"
                   if n.op_type == "QuantizeLinear" else f"its input is {dtype}")
            problems.append(f"{n.op_type} '{n.name}': no zero point: {why}, TensorRT needs int8 (add an "
                            "int8 zero point of 0: the `trt` preset)")
    return problems


def _sharing_problems(q, consumers) -> list[str]:
    """TensorRT fuses a QuantizeLinear with the one DequantizeLinear it feeds; a shared Q cannot be fused."""
    users = consumers.get(q.output[0], [])
    if len(users) != 1 or users[0].op_type != "DequantizeLinear":
        return [f"QuantizeLinear '{q.name}' feeds {len(users)} nodes, not one DequantizeLinear (use dedicated "
                "Q/DQ pairs)"]
    return []


def _is_float_layer(n, inits, producers) -> bool:
    """A weighted op whose constant weight reaches it without a DequantizeLinear: TensorRT runs it in floating
    point, which is a choice, not a broken rule. (A MatMul's "weight" may be an activation, so it is never one.)"""
    w_in = n.input[WEIGHT_OPS[n.op_type]]
    dq = producers.get(w_in)
    return w_in in inits and n.op_type != "MatMul" and (dq is None or dq.op_type != "DequantizeLinear")


def _has_quantized_weight(n, inits, producers) -> bool:
    dq = producers.get(n.input[WEIGHT_OPS[n.op_type]])
    return dq is not None and dq.op_type == "DequantizeLinear" and _constant_weight(dq, inits, producers) is not None


def _is_activation_pair(dq, inits, producers) -> bool:
    """A DequantizeLinear fed by a QuantizeLinear of a tensor computed at run time; weights quantized from float
    initializers make Q/DQ pairs too, and are counted as weights instead."""
    if dq.op_type != "DequantizeLinear" or dq.input[0] in inits:
        return False
    q = producers.get(dq.input[0])
    return q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in inits


def check_tensorrt_qdq(model_or_path) -> QdqReport:
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    graph = model.graph
    inits = _constants(graph)
    elem_types = _elem_types(graph)
    producers, consumers = graph_links(graph)
    qnodes = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    problems = _graph_problems(model, qnodes)
    for n in qnodes:
        problems += _zero_point_problems(n, inits, producers, elem_types)
    weights = pairs = 0
    float_layers = []
    for n in graph.node:  # one pass in node order, so that problems are listed in the order of the graph
        if n.op_type == "QuantizeLinear":
            problems += _sharing_problems(n, consumers)
        if n.op_type in WEIGHT_OPS and len(n.input) > WEIGHT_OPS[n.op_type]:
            if _is_float_layer(n, inits, producers):
                float_layers.append(n.name or n.output[0])
                continue
            problems += _weight_problems(n, inits, producers)
            weights += _has_quantized_weight(n, inits, producers)
        pairs += _is_activation_pair(n, inits, producers)
    return QdqReport(not problems, problems, weights, pairs, float_layers)


def _constant_weight(dq, inits, producers) -> np.ndarray | None:
    """The weight behind a weight DequantizeLinear: its int8 constant, or the float one its Q reads."""
    if dq.input[0] in inits:
        return inits[dq.input[0]]
    q = producers.get(dq.input[0])
    if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inits:
        return inits[q.input[0]]
    return None


def _weight_problems(n, inits, producers) -> list[str]:
    w_in = n.input[WEIGHT_OPS[n.op_type]]
    dq = producers.get(w_in)
    if dq is None or dq.op_type != "DequantizeLinear":
        return []
    weight = _constant_weight(dq, inits, producers)
    if weight is None:  # an activation (MatMul of two activations) or a weight computed at run time
        return []
    expected, why = weight_channel_axis(n, weight.ndim)
    if expected is None:
        return [f"{n.op_type} '{n.name}': {why}"]
    channels = weight.shape[expected]
    q = producers.get(dq.input[0])
    per = "per input channel" if n.op_type == "ConvTranspose" else "per output channel"
    problems = []
    for qdq in (dq, q) if q is not None and q.op_type == "QuantizeLinear" else (dq,):
        scale = inits.get(qdq.input[1])
        axis = _attr(qdq, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        if scale is None or scale.ndim != 1 or (scale.size == 1 and channels != 1):
            problems.append(f"{n.op_type} '{n.name}': weight scale is not {per} (quantize weights per "
                            f"channel: {channels} scales on axis {expected})")
        elif axis != expected:
            problems.append(f"{n.op_type} '{n.name}': weight {qdq.op_type} axis is {axis}, TensorRT needs "
                            f"axis {expected} ({why})")
        elif scale.shape[0] != channels:
            problems.append(f"{n.op_type} '{n.name}': weight scale has {scale.shape[0]} entries for "
                            f"{channels} channels on axis {expected}: not {per} ({why})")
    return problems
