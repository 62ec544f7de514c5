# The Jetson image (JetPack 6, Orin): TensorRT engines (`edgekd build`, `--backend trt`) with JetPack's own
# TensorRT, and ONNX Runtime, no PyTorch. Build and run on the Jetson (arm64), from the repository root. Set
# "default-runtime": "nvidia" in /etc/docker/daemon.json first (NVIDIA's Jetson container setup) so that the
# build's checks see the same GPU libraries as `docker run --runtime nvidia`:
#   docker build -f docker/jetson.Dockerfile -t edgekd-jetson .
#   docker run --rm --runtime nvidia -v "$PWD/runs:/runs" edgekd-jetson build \
#       /runs/quickstart/digits/base/kd/seed0/bundle --fp16 --int8 --batch-range 1,64,256 --workspace-mb 1024
#   docker run --rm --runtime nvidia -v "$PWD/runs:/runs" edgekd-jetson bench \
#       /runs/quickstart/digits/base/kd/seed0/bundle --backend trt --device cuda
#   docker run --rm --runtime nvidia -v "$PWD/runs:/runs" edgekd-jetson bench \
#       /runs/quickstart/digits/base/kd/seed0/bundle --backend ort --device cuda
#
# Base: l4t-jetpack r36.4.0 = JetPack 6.1 (L4T 36.4): CUDA 12.6, cuDNN 9.3, TensorRT 10.3, Ubuntu 22.04 and its
# Python 3.10. It runs on a JetPack 6.x (L4T r36.x) host; pass --build-arg L4T_IMAGE=... for another r36 tag.
# TensorRT is JetPack's, in the system Python (python3-libnvinfer): pip must never replace it (TensorRT from PyPI
# is not built for Jetson). edgekd lives in a venv made with --system-site-packages so it sees that tensorrt,
# installs 'edgekd[jetson]' (cuda-python only), and the build fails if a tensorrt lands inside the venv.
ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
FROM ${L4T_IMAGE}
# ONNX Runtime GPU for JetPack 6 (CUDA 12.6, Python 3.10) from the Jetson AI Lab pip index, which NVIDIA's
# jetson-containers maintainers point to (the older source is the Jetson Zoo: https://elinux.org/Jetson_Zoo).
# Optional: with --build-arg ORT_GPU_INDEX= (empty), or when the index cannot be reached, the image gets the CPU
# onnxruntime from PyPI instead. Then `--backend ort` runs on the CPU only, and `--backend ort --device cuda`
# stops with an error naming the missing CUDAExecutionProvider; `--backend trt` does not need ONNX Runtime.
ARG ORT_GPU_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# JetPack's apt packages; python3-libnvinfer is TensorRT's Python, installed only if the image lacks it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && { python3 -c "import tensorrt" 2> /dev/null \
         || apt-get install -y --no-install-recommends python3-libnvinfer; } \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -c "import tensorrt; print('JetPack TensorRT', tensorrt.__version__, tensorrt.__file__)" \
    && python3 -m venv --system-site-packages /opt/edgekd \
    && echo 'numpy<2' > /opt/edgekd/constraints.txt
# NumPy 1.x: JetPack's Python modules and the Jetson wheels are built against it (an extension built against
# NumPy 2 also runs on 1.x; the reverse fails at import). PIP_CONSTRAINT keeps later pip installs to it too.
ENV VIRTUAL_ENV=/opt/edgekd PATH=/opt/edgekd/bin:$PATH PIP_CONSTRAINT=/opt/edgekd/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[jetson]' \
    && if [ -n "${ORT_GPU_INDEX}" ] \
          && pip install --no-cache-dir onnxruntime-gpu --index-url "${ORT_GPU_INDEX}"; then \
         echo "onnxruntime-gpu from ${ORT_GPU_INDEX}"; \
       else \
         echo "WARNING: no onnxruntime-gpu (ORT_GPU_INDEX='${ORT_GPU_INDEX}'): installing the CPU onnxruntime;" \
              "--backend ort --device cuda will refuse to run" >&2; \
         pip install --no-cache-dir onnxruntime; \
       fi \
    && python -c "import sys, tensorrt; assert not tensorrt.__file__.startswith(sys.prefix), \
'pip installed a tensorrt into the venv: ' + tensorrt.__file__; print('TensorRT', tensorrt.__version__)" \
    && python -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())" \
    && python -c "from cuda.bindings import runtime as rt; v = rt.cudaRuntimeGetVersion()[1]; \
assert v <= 12060, f'cuda-python runtime {v} is newer than JetPack 6 drivers (CUDA 12.6, 12060): pin cuda-python<12.7'; \
print('cuda-python runtime', v)" \
    && edgekd --help > /dev/null
ENTRYPOINT ["edgekd"]
