# The device-side image: `edgekd bench` with ONNX Runtime and no PyTorch (a few hundred MB, fits a Jetson
# or an x86 edge box). Build from the repository root:
#   docker build -f docker/bench.Dockerfile -t edgekd-bench .
#   docker run --rm -v $PWD/runs:/runs edgekd-bench bench /runs/quickstart/digits/base/kd/seed0/bundle
# On a Jetson, start from NVIDIA's l4t-tensorrt image instead and install 'edgekd[trt]' to bench engines.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
RUN pip install --no-cache-dir '.[bench]'
ENTRYPOINT ["edgekd"]
