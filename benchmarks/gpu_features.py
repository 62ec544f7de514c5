"""The study's newer paths on a CUDA GPU, on digits: a method grid tuned on validation, a spurious variant with
Grad-CAM (explain), students pruned and fine-tuned with KD (compress), qat-kd INT8 (quantization-aware training
on the GPU), export and an ONNX Runtime bench, then the report. One table, one JSON record.

    python benchmarks/gpu_features.py [--out DIR] [--device cuda|cpu]   # cpu: a dry run of this script

Needs torch-pruning, torchao and captum (edgekd[train]).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, show  # noqa: E402

PROFILE = """
[study]
name = "gpu-features"
seeds = [0]
device = "{device}"

[datasets.digits]
image_size = 16
hflip = false
crop_padding = 1

[teacher]
model = "resnet18"
epochs = {teacher_epochs}
batch_size = 64
lr = 0.05

[student]
model = "mobilenetv3_small_050"
epochs = {student_epochs}
batch_size = 64
lr = 0.05

[methods.kd]
ce = {{ weight = 0.1 }}
kd = {{ weight = 0.9, temperature = [2.0, 4.0] }}

[variants.base]
kind = "base"

[variants.spurious]
kind = "spurious"
p = 0.95

[compress]
prune = 0.5
finetune_epochs = {finetune_epochs}

[explain]
images = 32

[deploy]
targets = ["onnx", "int8"]
int8_presets = ["trt"]   # the GPU preset; cpu too doubles the qat-kd fine-tunes
int8_method = "qat-kd"
qat_epochs = 1
batch_sizes = [1, 64]
iters = 20
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--epochs", type=int, default=10, help="teacher and student epochs")
    args = parser.parse_args()
    import torch

    from edgekd.config import load_profile
    from edgekd.runio import read_json
    from edgekd.workflows import study as run_full_study

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_features: this PyTorch sees no CUDA GPU: run it on the GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-features-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu-features.toml"
    path.write_text(PROFILE.format(device=args.device, teacher_epochs=args.epochs, student_epochs=args.epochs,
                                   finetune_epochs=max(1, args.epochs // 3)))
    start = time.perf_counter()
    report = run_full_study(load_profile(path), out / "runs")
    wall = time.perf_counter() - start
    root = out / "runs" / "gpu-features"
    plan = read_json(root / "plan.json")
    runs, rows = {}, []
    for metrics_path in sorted(root.glob("digits/*/*/seed*/metrics.json")):
        m = read_json(metrics_path)
        if m.get("role") not in ("scratch", "kd", "teacher"):
            continue
        label = f"{m['variant']}/{m.get('method') or m['role']}"
        runs[label] = {k: m.get(k) for k in ("test_acc", "val_acc", "params", "train_s", "execution", "grid",
                                             "pruned")}
        bundle = metrics_path.parent / "bundle" / "manifest.json"
        if bundle.is_file():
            models = read_json(bundle)["models"]
            runs[label]["int8"] = {k: {f: v.get(f) for f in ("accuracy", "accuracy_change_vs_fp32", "parity",
                                                             "tensorrt_qdq_check", "seconds", "epochs")}
                                   for k, v in models.items() if "int8" in k}
            for k, v in runs[label]["int8"].items():
                rows.append([label, k, f"{100 * (m['test_acc'] or 0):.2f}", f"{100 * v['accuracy']:.2f}",
                             f"{100 * v['parity']['top1_agreement']:.2f}", v.get("seconds")])
    explains = {str(p.relative_to(root)): read_json(p) for p in sorted(root.glob("digits/*/explain/seed*/explain.json"))}
    show(f"edgekd study on {args.device} ({torch.cuda.get_device_name(0) if args.device == 'cuda' else 'CPU'}): "
         f"{wall:.0f} s", ["run", "INT8 model", "FP32 test %", "qat-kd eval %", "ONNX = fake-quant %", "qat s"], rows)
    path = save("gpu-features", {
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__, "wall_s": round(wall, 1), "plan_execution": plan.get("execution"),
        "runs": runs, "explain": {k: {"images": v["images"], "cue": v["cue"], "models": v["models"]}
                                  for k, v in explains.items()},
        "report": str(report.files.get("md")) if report else None})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
