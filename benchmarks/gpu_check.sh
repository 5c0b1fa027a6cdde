#!/usr/bin/env bash
# The project's check on a machine with a GPU, in under 9 minutes: the CUDA tests, the training, memory, epoch
# and time-to-accuracy benchmarks on CUDA, two pairs of the paper preset, then the whole test suite on CUDA with
# the time that is left. It needs torch with CUDA in $PYTHON's environment and the library's dependencies (it
# tries an offline `pip install --no-deps -e .` for the command line, else runs from PYTHONPATH) and, for
# CIFAR-10, CIFAR10_DIR (an image-folder copy, train/ test/; 2,000 training images per class are enough).
#
#   CIFAR10_DIR=/data/cifar10-jpeg OUT=gpu-check bash benchmarks/gpu_check.sh
#
# Every step has a time limit and the script goes on after a step that fails, so that one failure does not
# hide the rest; the whole run stops before DEADLINE seconds (default 540). It writes at most 8 files to $OUT
# (log.txt, the benchmarks' JSON, the paper preset's cells and heatmap, tests.txt) and works in $WORK.
# Copy the printed figures into docs/performance.md with the GPU model from the top of log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
WORK=${WORK:-/tmp/modelstitch-gpu-check}
PYTHON=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee -a "$OUT/log.txt") 2>&1

"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" ||
  exit 1
# the docs tests call the `modelstitch` command: install it offline if this environment can (no dependencies)
"$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
  echo "could not install the package: the docs tests that call the modelstitch command will fail"
"$PYTHON" -c "import torch, platform; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}')"
nproc

# step NAME MAX_SECONDS COMMAND...: run COMMAND with at most MAX_SECONDS, and never past the deadline
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  echo
  echo "== $name ($(date +%T), ${SECONDS} s in, limit ${limit} s)"
  if ((limit < 10)); then
    echo "skipped: no time left"
    return 0
  fi
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
}

step "CUDA tests" 60 "$PYTHON" -m pytest -q -p no:cacheprovider -k "cuda or gpu_path" tests/

step "one cell: library vs floor vs naive, on CUDA" 60 \
  "$PYTHON" benchmarks/bench_train.py --device cuda --repeats 3 --json "$OUT/bench_train.json"

step "peak memory against the number of pairs, on CUDA" 50 \
  "$PYTHON" benchmarks/bench_memory.py --device cuda --pairs 1,4 --layers "" --json "$OUT/bench_memory.json"

step "seconds per stitch-epoch: R2222 width 64, 50,000 images, layer4.1 into all 9 receiver layers" 80 \
  "$PYTHON" benchmarks/bench_epoch.py --device cuda --sender-layers layer4.1 --json "$OUT/bench_epoch.json"

if [ -n "${CIFAR10_DIR:-}" ]; then
  step "time to accuracy on CIFAR-10 (cifar-small networks, R1111 -> R1211)" 130 \
    "$PYTHON" benchmarks/bench_study.py --device cuda --data cifar10 --data-root "$CIFAR10_DIR" \
    --fast-options --epochs 1,2,4 --candidate batch_size=32,epochs=0.75,lr=0.03,amp=true,channels_last=true \
    --out "$WORK/bench-study" --json "$OUT/bench_study.json"

  step "the paper preset: 2 pairs and their controls on 5,000 images, 2 epochs, bf16" 90 \
    "$PYTHON" -m modelstitch.cli study run --preset paper --data-root "$CIFAR10_DIR" --limit 5000 \
    --epochs 2 --max-pairs 2 --precision bf16 --device cuda --quiet --out "$WORK/paper"
  cp "$WORK/paper/heatmaps.png" "$OUT/paper-heatmaps.png" 2>/dev/null
  cp "$WORK/paper/cells.csv" "$OUT/paper-cells.csv" 2>/dev/null
else
  echo "CIFAR10_DIR is not set: skipping the CIFAR-10 benchmark and the paper preset"
fi

step "the whole test suite, on CUDA where a test lets the device be chosen" 300 \
  "$PYTHON" -m pytest -q -p no:cacheprovider -n 12 --tb=short -rfE tests/ >"$OUT/tests.txt" 2>&1
tail -15 "$OUT/tests.txt"
echo
echo "results in $OUT/ after $SECONDS s"
