# The CPU device image: `edgekd bench` with ONNX Runtime (CPU) and no PyTorch (a few hundred MB; x86 or arm64
# edge boxes and laptops). Python 3.10, the oldest the device half of edgekd supports and JetPack 6's Python,
# so this image also catches 3.11-only code before it reaches a Jetson. Build from the repository root:
#   docker build -f docker/bench.Dockerfile -t edgekd-bench .
#   docker run --rm -v "$PWD/runs:/runs" edgekd-bench bench /runs/quickstart/digits/base/kd/seed0/bundle
# NVIDIA GPUs: docker/gpu.Dockerfile (x86, TensorRT + ONNX Runtime GPU). Jetson: docker/jetson.Dockerfile
# (JetPack 6, the system TensorRT). See docker/README.md.
FROM python:3.10-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
# The versions come from pyproject.toml's extras; the package installed is this checkout.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[bench]' \
    && python -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())" \
    && edgekd --help > /dev/null
ENTRYPOINT ["edgekd"]
