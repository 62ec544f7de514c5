"""Why a `cpu` INT8 model collapses: the same Q/DQ model run op by op in float vs through ONNX Runtime's fused x86
integer kernels, for per-channel / per-tensor / 7-bit (reduce_range) weights. Scores each on a student's validation
split and views: the share of FP32's top-1 answers changed (the INT8 guard's measure).

    python benchmarks/int8_saturation.py RUN_DIR      # a student run with a bundle (edgekd study or edgekd export)

Writes benchmarks/results/int8_saturation-cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import save, show  # noqa: E402

from edgekd.config import DatasetConfig  # noqa: E402
from edgekd.data.splits import SPLIT_SEED, load_splits, stratified_cap  # noqa: E402
from edgekd.export.int8 import validation_views  # noqa: E402
from edgekd.runio import BUNDLE, METRICS, RUN_PROFILE, read_json  # noqa: E402
from edgekd.runtime.evalset import normalize  # noqa: E402

VARIANTS = {  # name: (per_channel, reduce_range)
    "per-channel S8 weights (the old cpu preset)": (True, False),
    "per-tensor S8 weights": (False, False),
    "per-channel 7-bit weights (reduce_range, the cpu preset now)": (True, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--calib-size", type=int, default=512)
    args = parser.parse_args()
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    metrics, profile = read_json(args.run / METRICS), read_json(args.run / RUN_PROFILE)
    dataset = DatasetConfig(**profile["profile"]["datasets"][metrics["dataset"]])
    data = load_splits(metrics["dataset"], dataset)
    val_x, _, views = validation_views(data.val.images, data.val.labels.numpy(), dataset.crop_padding, dataset.hflip)
    x = normalize(val_x, data.mean, data.std)
    calib = normalize(stratified_cap(data.train, args.calib_size, data.num_classes, SPLIT_SEED + 4).images.numpy(),
                      data.mean, data.std)

    class Reader:
        def __init__(self):
            self.batches = iter([calib[i : i + 32] for i in range(0, len(calib) - len(calib) % 32, 32)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    levels = {"op by op in float (ORT_DISABLE_ALL)": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "fused integer kernels (ORT_ENABLE_ALL)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

    def answers(path: Path, level) -> np.ndarray:
        options = ort.SessionOptions()
        options.graph_optimization_level, options.log_severity_level = level, 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return np.concatenate([session.run(None, {"input": x[i : i + 512]})[0].argmax(1)
                               for i in range(0, len(x), 512)])

    fp32 = args.run / BUNDLE / "model.onnx"
    reference = answers(fp32, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32), str(pre))
        for name, (per_channel, reduce_range) in VARIANTS.items():
            quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
            rows.append({"weights": name, **{level: round(float((answers(out, value) != reference).mean()) * 100, 2)
                                             for level, value in levels.items()}})
    show(f"answers changed vs FP32 (%), {metrics['dataset']} validation ({len(data.val)} images x {views} views), "
         f"{args.run}", ["weights (U8 activations, minmax)", *levels], [list(r.values()) for r in rows])
    print(save("int8_saturation", {"run": str(args.run), "images": len(data.val), "views": views, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
