#!/usr/bin/env bash
# GPU check: the CUDA tests and the benchmarks on one GPU, then a short table, in under 7 minutes.
#
#   bash bench/gpu_check.sh prepare [PYTHON_VERSION ...]   # here, with a package index: fills .gpu-prep/
#   bash bench/gpu_check.sh                                # on the GPU machine, with .gpu-prep/ beside it
#
# The GPU machine may have torch, Triton and cupy but no pytest, no network and no nvcc. `prepare`
# gathers exactly what the run needs into .gpu-prep/ (ignored by git, so it must travel with the
# working tree explicitly): the wheels of pytest, pytest-benchmark and their dependencies for each
# Python version given (default: 3.11 and 3.12; pure-Python wheels, so any platform), Liger-Kernel
# (without dependencies: it needs only torch and Triton), and the kNN cubins for sm_90 when nvcc is
# here (so the GPU needs neither nvcc nor NVRTC).
#
# The run writes into $OUT (default ./gpu-check) as it goes, so a kill loses at most the step in
# flight: summary.txt (one line per step, with what was skipped and why), env.txt, tests.txt (one line
# per test, pytest -v), results.jsonl (one JSON line per measurement, written when it is taken) and
# table.txt. Every step has its own timeout inside one budget (SAGE_FAST_GPU_BUDGET_S, default 400 s),
# so the whole script stays under 7 minutes; later steps are skipped, with a line saying so, when the
# budget is spent.
set -uo pipefail
cd "$(dirname "$0")/.."
PREP=${SAGE_FAST_GPU_PREP:-.gpu-prep}

prepare() {
  local versions=("$@")
  [ ${#versions[@]} -eq 0 ] && versions=(3.11 3.12)
  rm -rf "$PREP"
  mkdir -p "$PREP/wheels" "$PREP/cubins"
  for v in "${versions[@]}"; do
    # --only-binary and --python-version: the wheels that Python $v resolves to, dependencies included
    # (pluggy, iniconfig, packaging, py-cpuinfo, and exceptiongroup / tomli below 3.11)
    python -m pip download -q --dest "$PREP/wheels" --only-binary=:all: --python-version "$v" \
      --implementation cp --platform manylinux_2_17_x86_64 "pytest>=8" "pytest-benchmark>=4" || return 1
  done
  python -m pip download -q --dest "$PREP/wheels" --no-deps --only-binary=:all: "liger-kernel>=0.5" \
    || echo "prepare: liger-kernel not downloaded (the run will skip the Liger peer)" >&2
  if command -v nvcc >/dev/null 2>&1; then
    for arch in ${SAGE_FAST_CUDA_ARCHS:-90}; do
      for src in kernels/*.cu; do
        nvcc -cubin -O3 -std=c++17 -arch="sm_$arch" -I kernels \
          -o "$PREP/cubins/$(basename "$src" .cu).sm_$arch.cubin" "$src" || return 1
      done
    done
  else
    echo "prepare: no nvcc here; the GPU machine will build the kernels itself (nvcc or NVRTC)" >&2
  fi
  ls -1 "$PREP/wheels" "$PREP/cubins" > "$PREP/MANIFEST"
  du -sh "$PREP"
  echo "prepared $PREP for Python ${versions[*]}; carry it with the working tree (it is ignored by git)"
}

if [ "${1:-}" = "prepare" ]; then
  shift
  prepare "$@"
  exit $?
fi

START=$SECONDS
BUDGET=${SAGE_FAST_GPU_BUDGET_S:-400}
left() { echo $((BUDGET - (SECONDS - START))); }
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export SAGE_FAST_BENCH_STREAM="$OUT/results.jsonl"
unset TRITON_INTERPRET
say() { echo "$*" | tee -a "$OUT/summary.txt"; }

# Install from the carried wheels only (no network): into the environment when pip may, else into a
# folder on PYTHONPATH; without pip, unpack the wheels (pure Python: a wheel is a zip of a site folder).
install_wheels() {
  local args=(--no-index --find-links "$PREP/wheels" -q "$@")
  python -m pip install "${args[@]}" 2>>"$OUT/pip.txt" && return 0
  python -m pip install --break-system-packages "${args[@]}" 2>>"$OUT/pip.txt" && return 0
  mkdir -p /tmp/sage-fast-site
  export PYTHONPATH="$PYTHONPATH:/tmp/sage-fast-site"
  python -m pip install --target /tmp/sage-fast-site "${args[@]}" 2>>"$OUT/pip.txt" && return 0
  for whl in "$PREP"/wheels/*.whl; do python -m zipfile -e "$whl" /tmp/sage-fast-site || return 1; done
}

# ------------------------------------------------------------------ 1. tools and environment
if ! python -c "import pytest, pytest_benchmark" 2>/dev/null; then
  if [ ! -d "$PREP/wheels" ]; then
    say "STOP: pytest / pytest-benchmark are missing and $PREP/wheels is not here: run" \
        "'bash bench/gpu_check.sh prepare' where a package index is reachable, and carry $PREP"
    exit 2
  fi
  install_wheels pytest pytest-benchmark || { say "STOP: could not install pytest from $PREP/wheels (see pip.txt)"; exit 2; }
fi
if ! python -c "import liger_kernel" 2>/dev/null && ls "$PREP"/wheels/liger_kernel-*.whl >/dev/null 2>&1; then
  install_wheels --no-deps liger-kernel || say "note: Liger-Kernel did not install; its peer is skipped"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/env.txt" 2>&1
python - >>"$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "cupy", "cuml", "liger_kernel", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001 - report, do not fail
        print(name, "not importable:", type(err).__name__, str(err)[:120])
import torch
print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
EOF
say "env: $(tr '\n' ';' < "$OUT/env.txt")"

# ------------------------------------------------------------------ 2. kernels
arch=$(python -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "")
if [ -z "${SAGE_FAST_CUBIN_DIR:-}" ]; then
  if [ -n "$arch" ] && ls "$PREP"/cubins/*.sm_"$arch".cubin >/dev/null 2>&1; then
    export SAGE_FAST_CUBIN_DIR="$PWD/$PREP/cubins"
    say "kernels: prebuilt cubins for sm_$arch from $PREP/cubins"
  elif [ -n "$arch" ] && command -v nvcc >/dev/null 2>&1; then
    export SAGE_FAST_CUBIN_DIR="$OUT/cubins"
    mkdir -p "$SAGE_FAST_CUBIN_DIR"
    for src in kernels/*.cu; do
      timeout 90 nvcc -cubin -O3 -std=c++17 -arch="sm_$arch" -I kernels \
        -o "$SAGE_FAST_CUBIN_DIR/$(basename "$src" .cu).sm_$arch.cubin" "$src" \
        || say "kernels: nvcc failed for $src (NVRTC at first use)"
    done
  elif [ -z "$arch" ]; then
    say "kernels: torch sees no CUDA device"
  else
    say "kernels: no prebuilt cubin for sm_$arch and no nvcc: NVRTC at first use"
  fi
fi
timeout 60 python -m sage_fast info > "$OUT/info.txt" 2>&1
fused=$(timeout 120 python -c "from sage_fast.regions import _gpu; ok, why = _gpu.fused_knn_loadable(); print(('yes: ' if ok else 'SKIP fused kNN: ') + why)" 2>&1 | tail -1)
say "fused kNN kernel: $fused"
python -c "import cuml" 2>/dev/null && have_cuml=1 || have_cuml=0
[ "$have_cuml" = 1 ] || say "SKIP cuML UMAP (tests and the regions benchmark): cuML is not installed (pip install 'sage-fast[gpu-cu13]')"

# ------------------------------------------------------------------ 3. correctness on the GPU
# The tests CI runs in the interpreter, now compiled. -v writes one line per test as it ends, so a
# timeout keeps every result before it.
t=$(( $(left) - 240 )); [ "$t" -gt 120 ] && t=120
if [ "$t" -ge 30 ]; then
  timeout -k 5 "$t" python -u -m pytest -v -rs -p no:cacheprovider tests/ops tests/regions/test_knn.py tests/kernels \
    > "$OUT/tests.txt" 2>&1
  rc=$?
  say "tests: $(grep -cE ' PASSED' "$OUT/tests.txt") passed, $(grep -cE ' FAILED| ERROR' "$OUT/tests.txt") failed," \
      "$(grep -cE ' SKIPPED' "$OUT/tests.txt") skipped$([ $rc -eq 124 ] && echo ", TIMED OUT after ${t}s")"
  grep -E ' (FAILED|ERROR)' "$OUT/tests.txt" | head -20 | tee -a "$OUT/summary.txt"
else
  say "SKIP tests: only $(left) s of the budget left"
fi

# ------------------------------------------------------------------ 4. speed
# Pass 1: sage_fast and its eager baseline in every suite; pass 2: torch.compile and Liger, whose
# compilation can take most of a minute per shape, with what time remains.
bench() {  # bench SUITE CAP PASS -k-expression
  local suite=$1 cap=$2 pass=$3 expr=$4 t
  t=$(( $(left) - 15 )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then say "SKIP bench $suite ($pass): only $(left) s of the budget left"; return; fi
  timeout -k 5 "$t" python -u -m pytest -q -p no:cacheprovider -p stream_results "bench/test_bench_$suite.py" \
    -k "$expr" --benchmark-columns=median > "$OUT/bench_${suite}_$pass.txt" 2>&1
  local rc=$?
  say "bench $suite ($pass): $([ $rc -eq 124 ] && echo "TIMED OUT after ${t}s, results so far kept" || echo "rc=$rc")"
}
bench kd_loss 70 main "not compile and not liger"
bench align_loss 45 main "not compile"
bench interpolate 45 main "not compile"
bench knn 50 main "not compile"
if [ "$have_cuml" = 1 ]; then bench regions 40 main "not compile"; fi
bench kd_loss 60 peers "compile or liger"
bench fused_linear_kd_loss 60 peers "fused_linear"
bench align_loss 40 peers "compile"
bench interpolate 40 peers "compile"

# ------------------------------------------------------------------ 5. the table
python bench/stream_results.py "$OUT/results.jsonl" > "$OUT/table.txt" 2>&1
echo
echo "== $(head -1 "$OUT/env.txt")"
echo "== summary"; cat "$OUT/summary.txt"
echo "== table (speed ratios > 1: sage_fast faster; mem/eager < 1: less peak memory)"; cat "$OUT/table.txt"
echo "== $((SECONDS - START)) s"
