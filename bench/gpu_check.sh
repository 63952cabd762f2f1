#!/usr/bin/env bash
# GPU check: the CUDA tests and the benchmarks on one GPU, then a short table. Budget: < 8 minutes.
#
# The GPU machine has torch, Triton and cupy but may have no network and no pytest: prepare the
# test tools here first, then ship them with the working tree:
#   pip download -d .wheels pytest pytest-benchmark
# and run this script with .wheels carried along. Results land in $OUT (or ./gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

if ! python -c "import pytest, pytest_benchmark" 2>/dev/null; then
  if [ -d .wheels ]; then
    python -m pip install -q --no-index --find-links .wheels pytest pytest-benchmark
  else
    echo "pytest / pytest-benchmark missing and no .wheels folder: see the header of this script" >&2
    exit 2
  fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# A bare checkout has no prebuilt cubins: build them for this GPU when nvcc is here (otherwise cupy
# compiles the kernels with NVRTC, and without NVRTC the kNN falls back to its GEMM path).
if [ -z "${SAGE_FAST_CUBIN_DIR:-}" ] && command -v nvcc >/dev/null 2>&1; then
  arch=$(python -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  export SAGE_FAST_CUBIN_DIR="$OUT/cubins"
  mkdir -p "$SAGE_FAST_CUBIN_DIR"
  for src in kernels/*.cu; do
    stem=$(basename "$src" .cu)
    nvcc -cubin -O3 -std=c++17 -arch="sm_$arch" -I kernels -o "$SAGE_FAST_CUBIN_DIR/$stem.sm_$arch.cubin" "$src" \
      || echo "nvcc failed for $src: NVRTC at first use" >&2
  done
fi
python -m sage_fast info | tee "$OUT/info.txt"

# Correctness on the GPU first: the same tests CI runs in the interpreter, now compiled. No -x: one
# GPU run should report every failure (the full list is in $OUT/tests.txt).
timeout 240 python -m pytest -q tests/ops tests/regions/test_knn.py -p no:cacheprovider \
  2>&1 | tee "$OUT/tests.txt" | tail -5

# Then speed: every suite, one table of ratios against eager in the same run.
SAGE_FAST_BENCH_TABLE="$OUT/bench_table.txt" timeout 300 python -m pytest -q bench -p no:cacheprovider \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=median 2>&1 | tail -60 > "$OUT/bench.txt"

echo
echo "== tests"; tail -1 "$OUT/tests.txt"
echo "== benchmarks (speedup and memory are relative to eager in the same group)"
cat "$OUT/bench_table.txt" 2>/dev/null || tail -30 "$OUT/bench.txt"
