"""TensorRT Q/DQ rules on small hand-built graphs: per-channel axes by op and layout, and zero-point types."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekd.export.qdq_rules import check_tensorrt_qdq

K, N = 6, 4  # a Gemm/MatMul weight's input features and output channels; unequal so a wrong axis shows


def _model(nodes, inits, inputs, opset=13, out_rank=2):
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"d{i}" for i in range(out_rank)])
    graph = helper.make_graph(nodes, "g", inputs, [y],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _act_qdq(zero_point=True):
    """x -> QuantizeLinear -> DequantizeLinear -> xd, per tensor."""
    zp = ["a_z"] if zero_point else []
    return ([helper.make_node("QuantizeLinear", ["x", "a_s", *zp], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "a_s", *zp], ["xd"], name="dq_x")],
            {"a_s": np.array(0.05, np.float32), **({"a_z": np.array(0, np.int8)} if zero_point else {})})


def _weight_graph(op, w_shape, scale_len, axis, trans_b=None, float_weights=False, w_dtype=np.int8,
                  weight_zp=True, act_zp=True):
    """One weight op: a Q/DQ activation and a per-channel Q/DQ (or int8 initializer + DQ) weight."""
    nodes, inits = _act_qdq(act_zp)
    w = np.ones(w_shape, np.float32 if float_weights else w_dtype)
    inits |= {"w": w, "w_s": np.full(scale_len, 0.1, np.float32)}
    zp = []
    if weight_zp:
        inits["w_z"] = np.zeros(scale_len, np.int8)
        zp = ["w_z"]
    if float_weights:
        nodes.append(helper.make_node("QuantizeLinear", ["w", "w_s", *zp], ["wq"], name="q_w", axis=axis))
        nodes.append(helper.make_node("DequantizeLinear", ["wq", "w_s", *zp], ["wd"], name="dq_w", axis=axis))
    else:
        nodes.append(helper.make_node("DequantizeLinear", ["w", "w_s", *zp], ["wd"], name="dq_w", axis=axis))
    attrs = {} if trans_b is None else {"transB": trans_b}
    nodes.append(helper.make_node(op, ["xd", "wd"], ["y"], name="op", **attrs))
    x_shape = {"Gemm": [2, K], "MatMul": [2, K], "ConvTranspose": [1, w_shape[0], 5, 5]}[op]
    return _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                  out_rank=len(x_shape))


def _assert_problem(report, text):
    assert not report.ok and any(text in p for p in report.problems), report.problems


def _runs_in_onnxruntime(model):
    """The graph is valid ONNX that ONNX Runtime accepts (per-axis scale lengths included)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = sess.get_inputs()[0]
    sess.run(None, {x.name: np.zeros(x.shape, np.float32)})


@pytest.mark.parametrize("float_weights", [False, True])
def test_gemm_transb0_per_channel_on_axis_1_passes(float_weights):
    model = _weight_graph("Gemm", (K, N), N, axis=1, trans_b=0, float_weights=float_weights)
    _runs_in_onnxruntime(model)
    report = check_tensorrt_qdq(model)
    assert report.ok, report.problems
    assert report.quantized_weights == 1 and report.activation_pairs == 1


def test_gemm_transb0_scales_on_axis_0_fail():
    # K scales on axis 0 scale the input features, not the output channels (the columns of B [K, N])
    report = check_tensorrt_qdq(_weight_graph("Gemm", (K, N), K, axis=0, trans_b=0))
    _assert_problem(report, "axis is 0, TensorRT needs axis 1")


def test_gemm_transb1_needs_axis_0():
    assert check_tensorrt_qdq(_weight_graph("Gemm", (N, K), N, axis=0, trans_b=1)).ok
    _assert_problem(check_tensorrt_qdq(_weight_graph("Gemm", (N, K), K, axis=1, trans_b=1)),
                    "TensorRT needs axis 0")


def test_matmul_weight_per_output_column():
    good = _weight_graph("MatMul", (K, N), N, axis=1)
    _runs_in_onnxruntime(good)
    assert check_tensorrt_qdq(good).ok, check_tensorrt_qdq(good).problems
    _assert_problem(check_tensorrt_qdq(_weight_graph("MatMul", (K, N), K, axis=0)), "TensorRT needs axis 1")


def test_matmul_of_two_activations_is_not_a_weight():
    nodes, inits = _act_qdq()
    nodes += [helper.make_node("QuantizeLinear", ["x2", "a_s", "a_z"], ["x2q"], name="q_x2"),
              helper.make_node("DequantizeLinear", ["x2q", "a_s", "a_z"], ["x2d"], name="dq_x2"),
              helper.make_node("MatMul", ["xd", "x2d"], ["y"], name="mm")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K]),
                                  helper.make_tensor_value_info("x2", TensorProto.FLOAT, [K, N])])
    report = check_tensorrt_qdq(model)
    assert report.ok, report.problems
    assert report.quantized_weights == 0 and report.activation_pairs == 2


def test_conv_transpose_needs_axis_0():
    # ConvTranspose weight [C_in, C_out, kH, kW]; TensorRT takes per-input-channel scales (axis 0) only.
    c_in, c_out = 3, 5
    good = _weight_graph("ConvTranspose", (c_in, c_out, 3, 3), c_in, axis=0)
    _runs_in_onnxruntime(good)
    assert check_tensorrt_qdq(good).ok, check_tensorrt_qdq(good).problems
    # axis 1 (what ONNX Runtime's quantizer picks for ConvTranspose) is per output channel: not for TensorRT
    bad = _weight_graph("ConvTranspose", (c_in, c_out, 3, 3), c_out, axis=1)
    _runs_in_onnxruntime(bad)
    _assert_problem(check_tensorrt_qdq(bad), "axis is 1, TensorRT needs axis 0")


def test_quantize_linear_without_zero_point_is_uint8():
    model = _weight_graph("Gemm", (N, K), N, axis=0, trans_b=1, act_zp=False)
    _runs_in_onnxruntime(model)
    report = check_tensorrt_qdq(model)
    _assert_problem(report, "QuantizeLinear 'q_x': no zero point: defaults to uint8")
    _assert_problem(report, "DequantizeLinear 'dq_x': no zero point: its input is uint8")


def test_dequantize_linear_without_zero_point_takes_its_input_type():
    int8_w = _weight_graph("Gemm", (N, K), N, axis=0, trans_b=1, weight_zp=False)
    # int8 weights: the implied zero point is an int8 0
    assert check_tensorrt_qdq(int8_w).ok, check_tensorrt_qdq(int8_w).problems
    uint8_w = _weight_graph("Gemm", (N, K), N, axis=0, trans_b=1, w_dtype=np.uint8, weight_zp=False)
    _assert_problem(check_tensorrt_qdq(uint8_w), "DequantizeLinear 'dq_w': no zero point: its input is uint8")


@pytest.mark.parametrize("to, problem", [(TensorProto.INT8, None),
                                         (TensorProto.UINT8, "zero point is uint8")])
def test_zero_point_cast_from_a_constant(to, problem):
    # pytorch-quantization exports zero points as Cast(Constant) rather than as an initializer
    nodes = [helper.make_node("Constant", [], ["z32"], value=numpy_helper.from_array(np.array(0, np.int32))),
             helper.make_node("Cast", ["z32"], ["a_z"], to=to),
             helper.make_node("QuantizeLinear", ["x", "a_s", "a_z"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "a_s", "a_z"], ["y"], name="dq_x")]
    model = _model(nodes, {"a_s": np.array(0.05, np.float32)},
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])])
    _runs_in_onnxruntime(model)
    report = check_tensorrt_qdq(model)
    if problem is None:
        assert report.ok, report.problems
    else:
        _assert_problem(report, problem)


def test_opset21_output_dtype_int8_needs_no_zero_point():
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_s"], ["xq"], name="q_x",
                              output_dtype=TensorProto.INT8),
             helper.make_node("DequantizeLinear", ["xq", "a_s"], ["y"], name="dq_x")]
    model = _model(nodes, {"a_s": np.array(0.05, np.float32)},
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])], opset=21)
    assert check_tensorrt_qdq(model).ok, check_tensorrt_qdq(model).problems


def test_trt_preset_output_passes(tmp_path):
    """ONNX Runtime's quantizer with the `trt` preset on Conv -> Gemm(transB=0) -> MatMul passes the rules."""
    from edgekd.export.int8 import quantize

    rng = np.random.default_rng(0)
    inits = {"cw": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "cb": np.zeros(4, np.float32),
             "gw": rng.standard_normal((4 * 6 * 6, 10)).astype(np.float32), "gb": np.zeros(10, np.float32),
             "mw": rng.standard_normal((10, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["g"], name="gemm", transB=0),
             helper.make_node("MatMul", ["g", "mw"], ["y"], name="matmul")]
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(_model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                     opset=17), str(fp32))
    out = tmp_path / "int8-trt.onnx"
    quantize(fp32, out, rng.standard_normal((64, 1, 8, 8)).astype(np.float32), "trt")
    model = onnx.load(str(out))
    axes = {n.name: next((a.i for a in n.attribute if a.name == "axis"), 1) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in {i.name for i in model.graph.initializer}}
    assert 1 in axes.values(), axes  # the Gemm (transB=0) and MatMul weights are per channel on axis 1
    report = check_tensorrt_qdq(model)
    assert report.ok, report.problems
    assert report.quantized_weights == 3


def test_a_float_weighted_layer_is_listed_not_failed():
    """A Gemm with a float weight and no Q/DQ runs in floating point under TensorRT's explicit quantization: the
    check passes and lists it; a quantized one beside it still counts."""
    nodes, inits = _act_qdq()
    inits |= {"w": np.ones((N, K), np.float32), "w8": np.ones((N, N), np.int8), "w_s": np.full(N, 0.1, np.float32),
              "w_z": np.zeros(N, np.int8)}
    nodes += [helper.make_node("Gemm", ["xd", "w"], ["h"], name="float_fc", transB=1),
              helper.make_node("DequantizeLinear", ["w8", "w_s", "w_z"], ["wd"], name="dq_w", axis=0),
              helper.make_node("Gemm", ["h", "wd"], ["y"], name="int8_fc", transB=1)]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K])])
    _runs_in_onnxruntime(model)
    report = check_tensorrt_qdq(model)
    assert report.ok, report.problems
    assert report.float_layers == ["float_fc"] and report.quantized_weights == 1
    assert report.to_dict()["float_layers"] == ["float_fc"]
