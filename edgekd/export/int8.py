"""Post-training static INT8 quantization with ONNX Runtime, calibrated on the dataset's training split.

Two presets: `cpu` (U8 activations, S8 per-channel weights, Q/DQ: fast on ORT's x86/ARM kernels) and `trt`
(symmetric S8 activations and weights, per-channel weights, dedicated Q/DQ pairs: TensorRT's explicit
quantization). The FP32 graph goes through ORT's quantization pre-processing first: without it, initializers the
exporter shares through Identity nodes leave convolutions unquantised and the "INT8" model runs slower than FP32.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekd.errors import EdgeKDError

CALIB_METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Preset:
    activation: str  # QUInt8 | QInt8
    symmetric_activations: bool
    dedicated_pairs: bool
    quantize_bias: bool  # TensorRT takes float biases and fuses them; int32 bias Q/DQ is not for it


PRESETS = {
    "cpu": Preset("QUInt8", symmetric_activations=False, dedicated_pairs=False, quantize_bias=True),
    "trt": Preset("QInt8", symmetric_activations=True, dedicated_pairs=True, quantize_bias=False),
}


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over an array of preprocessed training images."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int = 32):
        self.input_name = input_name
        # Equal batches only: the entropy and percentile calibrators stack per-batch outputs into one array.
        batch_size = min(batch_size, len(images))
        usable = len(images) - len(images) % batch_size
        self.batches = iter([images[i : i + batch_size] for i in range(0, usable, batch_size)])

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize(fp32_onnx: Path, out: Path, calibration: np.ndarray, preset: str, method: str = "minmax") -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if preset not in PRESETS:
        raise EdgeKDError(f"unknown INT8 preset {preset!r}: use cpu or trt")
    if method not in CALIB_METHODS:
        raise EdgeKDError(f"unknown calibration method {method!r}: use {', '.join(CALIB_METHODS)}")
    if len(calibration) == 0:
        raise EdgeKDError("no calibration images: raise --calib-size")
    p = PRESETS[preset]
    import onnx

    input_name = onnx.load(str(fp32_onnx), load_external_data=False).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_onnx), str(pre), skip_symbolic_shape=True)
        extra = {"ActivationSymmetric": p.symmetric_activations, "WeightSymmetric": True,
                 "DedicatedQDQPair": p.dedicated_pairs, "QuantizeBias": p.quantize_bias}
        if method == "percentile":
            extra["CalibPercentile"] = 99.999
        quantize_static(str(pre), str(out), _Batches(input_name, calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=False, activation_type=getattr(QuantType, p.activation),
                        weight_type=QuantType.QInt8,
                        calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                          "percentile": CalibrationMethod.Percentile}[method],
                        extra_options=extra)
