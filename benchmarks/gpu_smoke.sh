#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, one command: distill (tiny) -> export -> build (FP32/FP16/INT8 engines where
# TensorRT is present) -> bench with every GPU backend that is available (trt, ort-cuda, ort-trt, torch-cuda), plus
# ONNX Runtime on the CPU as the baseline; one table with the timing kind, JSON in benchmarks/results/.
#   bash benchmarks/gpu_smoke.sh [--out DIR] [--dataset digits|synthetic]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_smoke.py "$@"
