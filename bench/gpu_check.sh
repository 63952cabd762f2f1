#!/usr/bin/env bash
# GPU check: one run on one GPU, the most valuable results first, inside a budget that leaves a margin.
#
#   bash bench/gpu_check.sh prepare [PYTHON_VERSION ...]   # here, with a package index: fills .gpu-prep/
#   bash bench/gpu_check.sh                                # on the GPU machine, with .gpu-prep/ beside it
#   bash bench/gpu_check.sh dry-run                        # on any CPU: the same steps, tiny sizes
#
# A lent GPU comes once, for about 15 minutes of device time with its start-up, so the run gets no
# second try. The order is by value, so a cut-off run still answers the important questions:
#   1. smoke (seconds): Python, torch, triton, driver and device, and one CUDA op;
#   2. setup: the carried wheels, the kNN kernel's cubin;
#   3. correctness, each set under its own cap: kNN, the CUDA kernels' cubin, the Philox noise stream,
#      a representative set of kd_loss and align_loss cases (not all of them: each new autotuning key
#      compiles and times several configs), and the ops whole under torch.compile. The static sm_90
#      codegen tests are left out: they need no GPU and run in CI;
#   4. benchmarks, important first: kd_loss at LLM shapes, the fused kNN at d=2 and the 67k x 768
#      TF32 search (no fp32 cdist at 105k points), the fused-linear loss at 16k x 128k bf16 where this
#      checkout has it, the classifier shapes, align_loss and interpolate; then the torch.compile and
#      Liger columns.
# Every step's timeout is the smaller of its cap and what is left of the budget (SAGE_FAST_GPU_BUDGET_S,
# default 390 s) less a reserve for the table, so the run ends within the budget plus a few seconds;
# a step with too little left is skipped with a line saying so. docs/performance.md has the estimate.
#
# The GPU machine may have torch, Triton and cupy but no pytest, no network and no nvcc. `prepare`
# gathers what the run needs into .gpu-prep/ (ignored by git, so it must travel with the working tree
# explicitly): the wheels of pytest, pytest-benchmark and their dependencies for each Python version
# given (default 3.10 to 3.13; pure-Python wheels, so any platform; exceptiongroup and tomli for 3.10),
# Liger-Kernel without its dependencies (it needs only torch and Triton), and the kNN cubins for sm_90
# when nvcc is here (so the GPU needs neither nvcc nor NVRTC).
#
# Everything streams into $OUT (default ./gpu-check) as it lands, so a kill loses at most the step in
# flight: summary.txt (one line per step: counts, rc, timeouts, skips and why), env.txt, tests_*.txt
# (pytest -v, one line per test as it ends), results.jsonl (one JSON line per measurement, written when
# it is taken), bench_*.txt, and table.txt at the end.
#
# The dry run (`dry-run`, or SAGE_FAST_GPU_DRY_RUN=1) proves the plumbing on a CPU: the same steps
# and selections, the tests through the Triton interpreter, the benchmarks at SAGE_FAST_BENCH_SCALE
# (default 0.01) with one repetition, only the first SAGE_FAST_GPU_CHECK_MAX_TESTS (default 2) cases
# of each step, and every benchmark selection collected for a CUDA device as well, so a selection
# that would match nothing on the GPU fails here. It exits 1 when a step's selection is empty or
# pytest is misused. Its caps are twice the GPU's (SAGE_FAST_GPU_CAP_SCALE) inside a 600 s budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PREP=${SAGE_FAST_GPU_PREP:-.gpu-prep}

prepare() {
  local versions=("$@")
  [ ${#versions[@]} -eq 0 ] && versions=(3.10 3.11 3.12 3.13)
  rm -rf "$PREP"
  mkdir -p "$PREP/wheels" "$PREP/cubins"
  for v in "${versions[@]}"; do
    # --only-binary and --python-version: the wheels that Python $v resolves to, dependencies included
    # (pluggy, iniconfig, packaging, py-cpuinfo, pygments); pytest on 3.10 also needs the backports,
    # named here so that a resolver that skips environment markers still fetches them
    local extra=()
    [ "$v" = 3.10 ] && extra=("exceptiongroup>=1" "tomli>=1")
    python -m pip download -q --dest "$PREP/wheels" --only-binary=:all: --python-version "$v" \
      --implementation cp --platform manylinux_2_17_x86_64 "pytest>=8" "pytest-benchmark>=4" "${extra[@]}" \
      || return 1
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

case "${1:-}" in
  prepare) shift; prepare "$@"; exit $? ;;
  dry-run) DRY=1 ;;
  "") DRY=${SAGE_FAST_GPU_DRY_RUN:-0} ;;
  *) echo "usage: bash bench/gpu_check.sh [prepare [PYTHON_VERSION ...] | dry-run]" >&2; exit 2 ;;
esac

START=$SECONDS
# The dry run's CPU is slower at everything but the kernels (imports, the interpreter): more time.
BUDGET=${SAGE_FAST_GPU_BUDGET_S:-$([ "$DRY" = 1 ] && echo 600 || echo 390)}
RESERVE=10  # seconds kept for the table and the closing lines
left() { echo $((BUDGET - (SECONDS - START))); }
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
export PYTHONPATH="$PWD:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export SAGE_FAST_BENCH_STREAM="$OUT/results.jsonl"
if [ "$DRY" = 1 ]; then
  CAP_SCALE=${SAGE_FAST_GPU_CAP_SCALE:-2}
  export SAGE_FAST_BENCH_SCALE=${SAGE_FAST_BENCH_SCALE:-0.01} SAGE_FAST_BENCH_REPS=${SAGE_FAST_BENCH_REPS:-1}
  export SAGE_FAST_BENCH_DEVICE=cpu SAGE_FAST_GPU_CHECK_MAX_TESTS=${SAGE_FAST_GPU_CHECK_MAX_TESTS:-2}
  TEST_ENV=(TRITON_INTERPRET=1)  # the kernels through the interpreter; bench/conftest.py drops it
else
  CAP_SCALE=1
  TEST_ENV=()
  unset TRITON_INTERPRET
fi
say() { echo "$*" | tee -a "$OUT/summary.txt"; }
PLUMBING_FAILED=0

# The timeout for a step: its cap (scaled in the dry run), at most what the budget has left.
step_timeout() {
  local cap t
  cap=$(python3 -c "import sys; print(max(1, round(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "$CAP_SCALE" 2>/dev/null \
        || echo "$1")
  t=$(( $(left) - RESERVE )); [ "$t" -gt "$cap" ] && t=$cap
  echo "$t"
}

# pytest exit codes 4 (usage) and 5 (nothing collected) mean the step itself is wrong, not the code.
check_rc() {  # check_rc NAME RC
  if [ "$2" -eq 4 ] || [ "$2" -eq 5 ]; then
    say "PLUMBING: $1 exited $2 ($([ "$2" -eq 5 ] && echo "its selection matched no test" || echo "pytest usage error"))"
    PLUMBING_FAILED=1
  fi
}

# ------------------------------------------------------------------ 1. smoke: versions, one CUDA op
t=$(step_timeout 20)
timeout -k 2 "$t" python - > "$OUT/env.txt" 2>&1 <<'EOF'
import importlib, platform, subprocess
print("python", platform.python_version())
for name in ("torch", "triton", "cupy", "cuml", "liger_kernel", "pytest", "pytest_benchmark"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as err:  # noqa: BLE001 - report, do not fail
        print(name, "not importable:", type(err).__name__, str(err)[:120])
try:
    driver = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=5).stdout.strip()
except Exception as err:  # noqa: BLE001 - no driver tool here
    driver = f"no nvidia-smi ({type(err).__name__})"
print("driver", driver or "none")
import torch
if torch.cuda.is_available():
    x = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    ok = float(x.sum()) == float((1 << 20) * ((1 << 20) - 1) // 2)
    print("cuda", torch.version.cuda, "device", torch.cuda.get_device_name(),
          "sm_%d%d" % torch.cuda.get_device_capability(), "one op:", "ok" if ok else "WRONG SUM")
else:
    print("cuda", torch.version.cuda, "device none")
EOF
rc=$?
say "smoke: $(tr '\n' ';' < "$OUT/env.txt")$([ $rc -ne 0 ] && echo " rc=$rc")"

# ------------------------------------------------------------------ 2. setup: tools, kernels
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
# A Liger that is installed but does not import (a Triton it was not built for) is a skip, not a failure.
liger=$(timeout 60 python -c "import liger_kernel.transformers; print('yes')" 2>&1 | tail -1)
[ "$liger" = yes ] || say "SKIP Liger peer: liger_kernel does not import here (${liger:0:160})"

arch=$(python -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "")
if [ -z "${SAGE_FAST_CUBIN_DIR:-}" ]; then
  if [ -n "$arch" ] && ls "$PREP"/cubins/*.sm_"$arch".cubin >/dev/null 2>&1; then
    export SAGE_FAST_CUBIN_DIR="$PWD/$PREP/cubins"
    say "kernels: prebuilt cubins for sm_$arch from $PREP/cubins"
  elif [ -n "$arch" ] && command -v nvcc >/dev/null 2>&1; then
    export SAGE_FAST_CUBIN_DIR="$OUT/cubins"
    mkdir -p "$SAGE_FAST_CUBIN_DIR"
    for src in kernels/*.cu; do
      timeout "$(step_timeout 60)" nvcc -cubin -O3 -std=c++17 -arch="sm_$arch" -I kernels \
        -o "$SAGE_FAST_CUBIN_DIR/$(basename "$src" .cu).sm_$arch.cubin" "$src" \
        || say "kernels: nvcc failed for $src (NVRTC at first use)"
    done
  elif [ -z "$arch" ]; then
    say "kernels: torch sees no CUDA device"
  else
    say "kernels: no prebuilt cubin for sm_$arch and no nvcc: NVRTC at first use"
  fi
fi
fused=$(timeout "$(step_timeout 30)" python -c "from sage_fast.regions import _gpu; ok, why = _gpu.fused_knn_loadable(); print(('yes: ' if ok else 'SKIP fused kNN: ') + why)" 2>&1 | tail -1)
say "fused kNN kernel: $fused"
python -c "import cuml" 2>/dev/null && have_cuml=1 || have_cuml=0
[ "$have_cuml" = 1 ] || say "SKIP cuML UMAP (its tests and the regions benchmark): cuML is not installed (pip install 'sage-fast[gpu-cu13]')"

# ------------------------------------------------------------------ 3. correctness
# -v writes one line per test as it ends, so a timeout keeps every result before it. The static
# codegen tests (sm_90 compilation, no GPU needed) are deselected: CI runs them.
NO_CODEGEN="not sm90 and not codegen and not vectorised and not spill"
tests() {  # tests NAME CAP PYTEST_ARGS...
  local name=$1 cap=$2 t rc file="$OUT/tests_$1.txt"
  shift 2
  t=$(step_timeout "$cap")
  if [ "$t" -lt 5 ]; then say "SKIP tests $name: only $(left) s of the budget left"; return; fi
  env "${TEST_ENV[@]}" timeout -k 5 "$t" python -u -m pytest -v -rs -p no:cacheprovider -p gpu_check_helpers "$@" \
    > "$file" 2>&1
  rc=$?
  say "tests $name: $(grep -cE ' PASSED' "$file") passed, $(grep -cE ' FAILED| ERROR' "$file") failed," \
      "$(grep -cE ' SKIPPED' "$file") skipped, rc=$rc$([ $rc -eq 124 ] && echo ", TIMED OUT after ${t}s")"
  grep -E ' (FAILED|ERROR)' "$file" | head -10 | tee -a "$OUT/summary.txt"
  [ $rc -eq 124 ] || check_rc "tests $name" "$rc"
}
tests knn 40 tests/regions/test_knn.py -k "$NO_CODEGEN"
tests cubin 15 tests/kernels/test_cuda_codegen.py -k "cubin or built or sources or parse"
tests philox 20 tests/ops/test_interpolate.py -k "philox or documented_stream or tiling or matches_float64 or host_sync"
tests kd_loss 40 tests/ops/test_kd_loss.py \
  -k "($NO_CODEGEN) and (matches_float64_reference or half_precision or retained_graph or backward_scaled or host_sync or partial_last)"
tests align_loss 25 tests/ops/test_align_loss.py \
  -k "($NO_CODEGEN) and (matches_float64_reference or backward_twice or reductions_and_backward or host_sync or chunked)"
tests compile 25 tests/ops/test_compile_graph_breaks.py

# ------------------------------------------------------------------ 4. speed
# Each step names its cases by the ids the suites give them (NAME SUITE CAP -k-expression), in order
# of value. In the dry run every selection is first collected for a CUDA device, so that a selection
# the GPU would not match fails here.
BENCH_PLAN=(
  "kd_llm kd_loss 45 32000 and not compile and not liger"
  "knn_d2 knn 35 d2"
  "knn_wide knn 45 not d2 and not d64"
  "fused_linear fused_linear_kd_loss 40 not compile"
  "kd_classes kd_loss 30 not 32000 and not compile and not liger"
  "align_loss align_loss 25 not compile"
  "interpolate interpolate 20 not compile"
  "regions regions 30 not compile"
  "kd_peers_llm kd_loss 40 32000 and (compile or liger)"
  "kd_peers kd_loss 25 not 32000 and (compile or liger)"
  "align_peers align_loss 25 compile"
  "interpolate_peers interpolate 20 compile"
  "knn_d64 knn 20 d64"
)
if [ "$DRY" = 1 ]; then
  selection_args=()
  for entry in "${BENCH_PLAN[@]}"; do
    read -r name suite _ expr <<< "$entry"
    [ -f "bench/test_bench_$suite.py" ] && selection_args+=("$name" "bench/test_bench_$suite.py" "$expr")
  done
  timeout 300 python bench/gpu_check_helpers.py selections "${selection_args[@]}" > "$OUT/selections.txt" 2>&1
  rc=$?
  say "benchmark cases each step selects on a GPU: $(tr '\n' ' ' < "$OUT/selections.txt")"
  [ $rc -eq 0 ] || { say "PLUMBING: a benchmark selection matches no case on a GPU (rc=$rc)"; PLUMBING_FAILED=1; }
fi

bench() {  # bench NAME SUITE CAP -k-expression
  local name=$1 suite=$2 cap=$3 expr=$4 t rc file="bench/test_bench_$2.py"
  if [ ! -f "$file" ]; then say "SKIP bench $name: $file is not in this checkout"; return; fi
  if [ "$suite" = regions ] && [ "$have_cuml" = 0 ]; then say "SKIP bench $name: no cuML"; return; fi
  t=$(step_timeout "$cap")
  if [ "$t" -lt 10 ]; then say "SKIP bench $name: only $(left) s of the budget left"; return; fi
  timeout -k 5 "$t" python -u -m pytest -q -p no:cacheprovider -p stream_results -p gpu_check_helpers "$file" \
    -k "$expr" --benchmark-columns=median > "$OUT/bench_$name.txt" 2>&1
  rc=$?
  if [ $rc -eq 124 ]; then
    say "bench $name: TIMED OUT after ${t}s, results so far kept"
  elif [ $rc -eq 5 ] && [ "$DRY" = 1 ]; then
    say "bench $name: no case of this selection on the CPU (its GPU cases were counted above)"
  else
    say "bench $name: rc=$rc"
    check_rc "bench $name" "$rc"
  fi
}
for entry in "${BENCH_PLAN[@]}"; do
  read -r name suite cap expr <<< "$entry"
  bench "$name" "$suite" "$cap" "$expr"
done

# ------------------------------------------------------------------ 5. the table
python bench/stream_results.py "$OUT/results.jsonl" > "$OUT/table.txt" 2>&1
echo
echo "== $(grep -m1 '^driver' "$OUT/env.txt")"
echo "== summary"; cat "$OUT/summary.txt"
echo "== table (speed ratios > 1: sage_fast faster; mem/eager < 1: less peak memory)"; cat "$OUT/table.txt"
echo "== $((SECONDS - START)) s of a ${BUDGET} s budget$([ "$DRY" = 1 ] && echo " (dry run on the CPU)")"
[ "$PLUMBING_FAILED" = 0 ]
