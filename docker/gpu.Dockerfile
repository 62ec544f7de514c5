# The x86 NVIDIA GPU image: TensorRT engines (`edgekd build`, `--backend trt`) and ONNX Runtime on CUDA
# (`--backend ort --device cuda`), no PyTorch. Build from the repository root, run with the NVIDIA Container
# Toolkit; build engines on the GPU that benches them (an engine is tied to its GPU and TensorRT version):
#   docker build -f docker/gpu.Dockerfile -t edgekd-gpu .
#   docker run --rm --gpus all -v "$PWD/runs:/runs" edgekd-gpu build /runs/quickstart/digits/base/kd/seed0/bundle \
#       --fp16 --int8 --batch-range 1,64,256 --workspace-mb 2048
#   docker run --rm --gpus all -v "$PWD/runs:/runs" edgekd-gpu bench /runs/quickstart/digits/base/kd/seed0/bundle \
#       --backend trt --device cuda
#   docker run --rm --gpus all -v "$PWD/runs:/runs" edgekd-gpu bench /runs/quickstart/digits/base/kd/seed0/bundle \
#       --backend ort --device cuda
#
# Base: NGC TensorRT 25.06 = TensorRT 10.11.0.33, CUDA 12.9, cuDNN 9, Ubuntu 24.04, Python 3.12. A CUDA 12 image
# on purpose: onnxruntime-gpu from PyPI is the CUDA 12 + cuDNN 9 build, and NGC images from 25.08 on are CUDA 13.
# The host driver must run CUDA 12.9 (R575 or newer, or a data-center branch NGC lists as forward compatible).
# An earlier CUDA 12 tag works too: --build-arg TRT_IMAGE=nvcr.io/nvidia/tensorrt:25.03-py3 (TensorRT 10.9).
# Not served by this image: `--backend ort-trt`. onnxruntime-gpu 1.26's TensorRT EP is built against TensorRT
# 10.14.1 and the image's is 10.11 (no CUDA 12 NGC image has 10.14; pip's tensorrt-cu12 would shadow the image's
# TensorRT). `--backend trt` (engines by the image's TensorRT) and `--backend ort --device cuda` are; on a host
# install, 'edgekd[gpu-cu12,trt-cu12]' pairs the two (TensorRT 10.14+).
#
# TensorRT comes from the image, never from pip: the engines must be built and run by the image's libnvinfer, and
# a second TensorRT from PyPI (what 'edgekd[trt-cu12]' would add) would shadow it with another version. So this
# installs 'edgekd[gpu-cu12]' plus cuda-python alone, in a venv that sees the image's site-packages
# (--system-site-packages works whether the image ships tensorrt as a pip wheel in the system Python or as the
# python3-libnvinfer deb), and the build fails if pip put a tensorrt inside the venv.
ARG TRT_IMAGE=nvcr.io/nvidia/tensorrt:25.06-py3
FROM ${TRT_IMAGE}
# cuda-python matching the image's CUDA major (12); the same pin as edgekd[trt-cu12], without its tensorrt-cu12.
ARG CUDA_PYTHON="cuda-python>=12.6.1,<13"
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c "import tensorrt; print('image TensorRT', tensorrt.__version__, tensorrt.__file__)" \
    && python3 -m venv --system-site-packages /opt/edgekd
ENV VIRTUAL_ENV=/opt/edgekd PATH=/opt/edgekd/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
# edgekd[gpu-cu12] is onnxruntime-gpu alone: never add edgekd[bench] (onnxruntime, the same module, CPU only).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[gpu-cu12]' "${CUDA_PYTHON}" \
    && python -c "import sys, tensorrt; assert not tensorrt.__file__.startswith(sys.prefix), \
'pip installed a tensorrt into the venv: ' + tensorrt.__file__; print('TensorRT', tensorrt.__version__)" \
    && if pip show onnxruntime > /dev/null 2>&1; then echo 'onnxruntime (CPU) beside onnxruntime-gpu' >&2; exit 1; fi \
    && python -c "import onnxruntime as ort; p = ort.get_available_providers(); print(ort.__version__, p); \
assert 'CUDAExecutionProvider' in p, 'not the GPU build of onnxruntime'" \
    && python -c "from cuda.bindings import driver; print('cuda-python ok')" \
    && edgekd --help > /dev/null
ENTRYPOINT ["edgekd"]
