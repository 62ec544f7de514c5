#!/usr/bin/env bash
# Issue 24's GPU figures, one part per call of a lent GPU machine (each part fits its 10-minute limit):
#
#   bash benchmarks/gpu_study_speed.sh quickstart  # the quickstart study's wall-time split (the default executor:
#                                                  # trainings share the GPU as measured), then torch.compile and
#                                                  # CUDA graphs against eager steps for its trainings
#   bash benchmarks/gpu_study_speed.sh fashion     # the KD step against the bare student step, then the
#                                                  # Fashion-MNIST study (3 seeds) with its split
#
# Fashion-MNIST's IDX files must be on the machine: copy them into the checkout first and carry that folder
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*-ubyte.gz data/fashion-mnist/
# (EDGEKD_DATA points here at data/ when it exists). Results: benchmarks/results/*-cuda.json, copied to $OUT when the
# device tool sets it. DEVICE=cpu runs the same steps on a CPU, to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:-quickstart}"
device="${DEVICE:-cuda}"
if [ -d data/fashion-mnist ]; then export EDGEKD_DATA="$PWD/data"; fi
name_suffix=""
[ "$device" = "cuda" ] || name_suffix="-script-check"

case "$part" in
  quickstart)
    timeout 300 python benchmarks/study_speed.py --set "study.device='$device'" \
      --name "study_speed-quickstart$name_suffix"
    timeout 270 python benchmarks/compile_speed.py --device "$device" --set "study.device='$device'" \
      --name "compile_speed-quickstart$name_suffix"
    ;;
  fashion)
    timeout 120 python benchmarks/train_throughput.py --device "$device" --workers 0 --images 6400
    timeout 420 python benchmarks/study_speed.py --profile profiles/fashion-mnist-study.toml \
      --set "study.device='$device'" --name "study_speed-fashion-mnist-study$name_suffix"
    ;;
  *)
    echo "unknown part '$part': use quickstart or fashion" >&2
    exit 2
    ;;
esac
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.json "$OUT"/
fi
