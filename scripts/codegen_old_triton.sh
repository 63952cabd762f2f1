#!/usr/bin/env bash
# The static sm_90 codegen tests under an older Triton (default 3.6.0, what the GPU image carries), in a
# virtual environment of their own, so that a bound tuned on the newest Triton cannot fail on the GPU
# for a kernel that is fine there (or pass here for one that is not).
#
#   bash scripts/codegen_old_triton.sh                 # Triton 3.6.0 into build/triton-3.6.0-env (once)
#   SAGE_FAST_OLD_TRITON=3.7.0 bash scripts/codegen_old_triton.sh
#
# Only Triton differs from the main environment (.venv): the codegen tests compile for sm_90 with
# Triton's own ptxas and never run torch code on a device, so torch, numpy and pytest are the main
# environment's, reached through a .pth file that puts its site folder after this environment's own
# (this Triton shadows the main one; nothing else is downloaded: one Triton wheel, about 190 MB).
# Each Triton keeps its own kernel cache (TRITON_CACHE_DIR), as the two must not share compiled code.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${SAGE_FAST_OLD_TRITON:-3.6.0}
ENV_DIR=${SAGE_FAST_OLD_TRITON_ENV:-build/triton-$VERSION-env}
[ -x .venv/bin/python ] || { echo "no .venv here: run scripts/bootstrap.sh first" >&2; exit 2; }
MAIN_SITE=$(.venv/bin/python -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")

if [ ! -x "$ENV_DIR/bin/python" ]; then
  "$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv "$ENV_DIR"
fi
SITE=$("$ENV_DIR/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$ENV_DIR/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('triton') != '$VERSION')" 2>/dev/null; then
  "$ENV_DIR/bin/python" -m pip install -q --no-deps "triton==$VERSION"
fi
# the repository (for sage_fast) and the main environment's packages, after this environment's own
printf '%s\n%s\n' "$PWD" "$MAIN_SITE" > "$SITE/zz_main_environment.pth"
"$ENV_DIR/bin/python" - "$VERSION" <<'PY'
import sys, triton, torch
assert triton.__version__ == sys.argv[1], f"triton {triton.__version__} shadows {sys.argv[1]}"
print(f"codegen under triton {triton.__version__} (from {triton.__file__}), torch {torch.__version__}")
PY

export TRITON_CACHE_DIR="$PWD/$ENV_DIR/triton-cache"
# Every static codegen test: the helper module's own, the kNN tile's, and each op's sm_90 checks.
exec "$ENV_DIR/bin/python" -m pytest -q -p no:cacheprovider "$@" \
  tests/ops/test_sm90.py tests/kernels/test_knn_tile_codegen.py \
  tests/ops/test_kd_loss.py tests/ops/test_align_loss.py tests/ops/test_interpolate.py \
  -k "test_sm90.py or knn_tile or sm90_codegen or compiled_kernel or compiled_backward"
