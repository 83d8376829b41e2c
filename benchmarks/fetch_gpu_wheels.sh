#!/usr/bin/env bash
# Download what the lent GPU machine lacks for the quantization benchmarks and GPU tests (ModelOpt and the
# dependencies its image does not have; see ../shared/REFERENCE.md) as Python 3.12 wheels into .whl/
# (git-ignored; ~21 MB, most of it PuLP's bundled solvers), the versions this repository's CI installs. Carry
# .whl/ to the GPU machine; run_all.sh installs it there with --no-deps (torch, numpy and the rest come from the
# machine's own image).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 2>&1 | grep -v "is ignored: it is neither" || true
ls -1 .whl
