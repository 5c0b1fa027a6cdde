#!/usr/bin/env bash
# The project's check on a machine with a GPU, in about 8 minutes: the CUDA tests, the training,
# memory and time-to-accuracy benchmarks on CUDA, and a few hundred cells of the paper preset, with their JSON and a
# heatmap under $OUT (default gpu-check/). Needs torch with CUDA in $PYTHON's environment (the script installs
# the package itself without dependencies) and, for CIFAR-10, CIFAR10_DIR (an image-folder copy, train/ test/).
#
#   CIFAR10_DIR=/data/cifar10-jpeg bash benchmarks/gpu_check.sh
#
# Then copy the printed figures into docs/performance.md with the GPU model from $OUT/gpu.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
"$PYTHON" -m pip install -q --no-deps -e . >/dev/null
"$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')" | tee "$OUT/gpu.txt"

step() { echo; echo "== $1 ($(date +%T))"; }

step "CUDA tests"
timeout 120 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or gpu_path" tests/ | tail -3 | tee "$OUT/cuda-tests.txt"

step "one cell: library vs floor vs naive, on CUDA"
timeout 150 "$PYTHON" benchmarks/bench_train.py --device cuda --json "$OUT/bench_train.json" | tail -8

step "peak memory against the number of pairs, on CUDA"
timeout 120 "$PYTHON" benchmarks/bench_memory.py --device cuda --pairs 1,4 --layers "" --json "$OUT/bench_memory.json" | tail -4

if [ -n "${CIFAR10_DIR:-}" ]; then
  step "time to accuracy on CIFAR-10 (cifar-small networks, R1111 -> R1211)"
  timeout 180 "$PYTHON" benchmarks/bench_study.py --device cuda --data cifar10 --data-root "$CIFAR10_DIR" \
    --fast-options --epochs 1,2 --out "$OUT/bench-study" --json "$OUT/bench_study.json" | tail -8

  step "the paper preset: 2 pairs and their controls on 5,000 images, bf16"
  timeout 150 "$PYTHON" -m modelstitch.cli study run --preset paper --data-root "$CIFAR10_DIR" --limit 5000 \
    --epochs 2 --max-pairs 2 --precision bf16 --device cuda --quiet --out "$OUT/paper" | tail -6
  cp "$OUT/paper/heatmaps.png" "$OUT/paper-heatmaps.png"
else
  echo "CIFAR10_DIR is not set: skipping the CIFAR-10 benchmark and the paper preset"
fi
echo; echo "results in $OUT/"
