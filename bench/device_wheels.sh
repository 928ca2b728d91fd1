#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, triton, transformers, pytest, rich, ... but no index to
# install from): omegaconf (golong.config), liger-kernel and cut-cross-entropy (benchmark peers), nvtx.
# Downloads them for CPython 3.12 manylinux into DIR (default .whl, which .git/info/exclude should ignore).
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHON=python3 GOLONG_COMMIT=<sha> bench/gpu_suite.sh /tmp/suite
set -euo pipefail
DIR=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DIR" \
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 nvtx==0.2.17 \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
ls "$DIR"
