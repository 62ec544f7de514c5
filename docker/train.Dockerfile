# The training image: distill, export, bench and report (PyTorch CPU or CUDA wheels from PyPI).
#   docker build -f docker/train.Dockerfile -t edgekd .
#   docker run --rm -v $PWD/runs:/src/runs edgekd study profiles/quickstart.toml
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgekd ./edgekd
COPY profiles ./profiles
RUN pip install --no-cache-dir '.[train]'
ENTRYPOINT ["edgekd"]
