"""Does a Q/DQ ONNX graph follow TensorRT's explicit-quantization rules? Names every node that breaks one.

TensorRT builds INT8 from QuantizeLinear/DequantizeLinear pairs when: the opset is 13 or later; zero points
are 0 (symmetric); activations and weights are signed INT8; weight scales are per output channel (axis 0 for
Conv and, with transB=1, for Gemm); and each QuantizeLinear feeds its own DequantizeLinear (no sharing).
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

    def to_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "quantized_weights": self.quantized_weights,
                "activation_pairs": self.activation_pairs}


def check_tensorrt_qdq(model_or_path) -> QdqReport:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:  # constants as Constant nodes count as initializers
        if node.op_type == "Constant" and node.attribute:
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel Q/DQ needs opset 13 or later (export with a newer opset)")
    qnodes = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qnodes:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: this is not an explicitly quantized graph")
    for n in qnodes:
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
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
    weights = pairs = 0
    for n in graph.node:
        if n.op_type == "QuantizeLinear":
            users = consumers.get(n.output[0], [])
            if len(users) != 1 or users[0].op_type != "DequantizeLinear":
                problems.append(f"QuantizeLinear '{n.name}' feeds {len(users)} nodes, not one DequantizeLinear "
                                "(use dedicated Q/DQ pairs)")
        if n.op_type in WEIGHT_OPS and len(n.input) > WEIGHT_OPS[n.op_type]:
            dq = producers.get(n.input[WEIGHT_OPS[n.op_type]])
            if dq is None or dq.op_type != "DequantizeLinear":
                if n.input[WEIGHT_OPS[n.op_type]] in inits and n.op_type != "MatMul":
                    problems.append(f"{n.op_type} '{n.name}': weight is not quantized (no DequantizeLinear)")
                continue
            weights += 1
            scale = inits.get(dq.input[1])
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            channels = inits[dq.input[0]].shape[0] if dq.input[0] in inits else None
            if channels is None and dq.input[0] in producers:  # weight quantized from a float initializer
                q = producers[dq.input[0]]
                channels = inits[q.input[0]].shape[0] if q.input[0] in inits else None
            if scale is None or scale.ndim != 1 or (channels is not None and scale.shape[0] != channels):
                problems.append(f"{n.op_type} '{n.name}': weight scale is not per output channel "
                                "(quantize weights per channel)")
            elif axis != 0 and n.op_type in ("Conv", "ConvTranspose"):
                problems.append(f"{n.op_type} '{n.name}': weight Q/DQ axis is {axis}, TensorRT needs axis 0")
        if n.op_type == "DequantizeLinear" and n.input[0] not in inits and producers.get(n.input[0]) is not None \
                and producers[n.input[0]].op_type == "QuantizeLinear":
            pairs += 1
    return QdqReport(not problems, problems, weights, pairs)
