"""torch's two ONNX exporters on edgekd's students, side by side in one run: export time, parity with PyTorch,
the graph each makes (nodes, ops), ONNX Runtime CPU latency and the INT8 (cpu preset, ptq) model made from it.

    python benchmarks/onnx_exporters.py [--repeats 3] [--name onnx_exporters]

Students: the README quickstart's (mobilenetv3_small_050 at 1x16x16) and Fashion-MNIST's two families
(mobilenetv3_small_050 and resnet10t at 1x28x28), randomly initialised (export time and graph do not depend on
the weights; parity is checked on random inputs). Writes benchmarks/results/NAME-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

STUDENTS = [("quickstart", "mobilenetv3_small_050", (1, 16, 16), True, 10),
            ("fashion-mnist", "mobilenetv3_small_050", (1, 28, 28), True, 10),
            ("fashion-mnist", "resnet10t", (1, 28, 28), False, 10)]


def measure(name, shape, small_input, classes, exporter, repeats, tmp: Path) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    from edgekd.export.bundle import _export_onnx
    from edgekd.models import create_model

    torch.manual_seed(0)
    model = create_model(name, classes, shape[0], small_input).eval()
    path = tmp / f"{name}-{shape[1]}-{exporter}.onnx"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _export_onnx(model, path, shape, exporter=exporter)
        times.append(time.perf_counter() - start)
    x = torch.randn(64, *shape)
    with torch.inference_mode():
        reference = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    one = x[:1].numpy()
    for _ in range(20):
        session.run(None, {"input": one})
    lat = []
    for _ in range(200):
        t = time.perf_counter()
        session.run(None, {"input": one})
        lat.append(time.perf_counter() - t)
    graph = onnx.load(str(path)).graph
    ops = Counter(n.op_type for n in graph.node)
    int8 = _int8(path, shape, tmp)
    return {"exporter": exporter, "export_s": times, "first_export_s": times[0],
            "median_export_s": statistics.median(times),
            "max_rel_logit_diff": float(np.abs(got - reference).max() / max(np.abs(reference).max(), 1e-12)),
            "nodes": len(graph.node), "ops": dict(ops.most_common()), "file_bytes": path.stat().st_size,
            "ort_cpu_p50_ms_b1": statistics.median(lat) * 1e3, **int8}


def _int8(path: Path, shape, tmp: Path) -> dict:
    """The cpu preset's plain ptq on random calibration images: does the graph quantize, and how."""
    import numpy as np
    import onnx

    from edgekd.export.quantize import Quantizer, Recipe

    calib = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    out = tmp / (path.stem + ".int8.onnx")
    try:
        start = time.perf_counter()
        with Quantizer(path, "cpu") as quantizer:
            quantizer.quantize(out, calib, Recipe(images=len(calib)))
            groups = len(quantizer.groups)  # what ptq-search's sensitivity and float regions work on
        seconds = time.perf_counter() - start
    except Exception as exc:  # recorded: a graph the quantizer cannot take is a finding
        return {"int8_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    return {"int8_s": seconds, "int8_groups": groups, "int8_quantize_linear": ops.get("QuantizeLinear", 0),
            "int8_dequantize_linear": ops.get("DequantizeLinear", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--name", default="onnx_exporters")
    args = ap.parse_args()
    from edgekd.targets import ONNX_EXPORTERS

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, name, shape, small_input, classes in STUDENTS:
            for exporter in ONNX_EXPORTERS:  # side by side, same process, same machine state
                r = {"dataset": dataset, "student": name, "shape": list(shape),
                     **measure(name, shape, small_input, classes, exporter, args.repeats, Path(tmp))}
                results.append(r)
                rows.append([f"{dataset} {name}", exporter, r["first_export_s"], r["median_export_s"],
                             f"{r['max_rel_logit_diff']:.1e}", r["nodes"], r["ort_cpu_p50_ms_b1"],
                             r.get("int8_groups", r.get("int8_error", "")), r.get("int8_quantize_linear", "")])
    show("torch's ONNX exporters (seconds; parity vs PyTorch as max |Δlogit| / max |logit|)",
         ["student", "exporter", "first export s", "median export s", "parity", "nodes", "ORT p50 ms b1",
          "INT8 groups", "INT8 QuantizeLinear"], rows)
    save(args.name, {"repeats": args.repeats, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
