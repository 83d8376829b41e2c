#!/usr/bin/env bash
# Download what the lent GPU machine lacks for bench_serve's Triton mode as Python 3.12 wheels into .srv/
# (git-ignored): nvidia-pytriton (the bundled tritonserver) and the gRPC client with the dependencies its image
# does not have. A carried folder may hold 64 MiB in all, so the PyTriton wheel is repacked with only the Python
# 3.12 backend stub (its other stubs are ~1.8 MB compressed); ~62 MB results. Carry .srv/ alone (not with .whl/),
# install there with: python3 -m pip install -q --no-deps .srv/*.whl
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .srv
"$PY" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_35_x86_64 -d .srv \
  nvidia-pytriton==0.7.0 tritonclient==2.73.0 grpcio==1.85.3 protobuf==6.33.6 python-rapidjson==1.25 2>&1 |
  grep -v "is ignored: it is neither" || true
"$PY" - <<'PY'
import glob, os, zipfile

src = glob.glob(".srv/nvidia_pytriton-*.whl")[0]
tmp = src + ".tmp"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for info in zin.infolist():
        if "python_backend_stubs/" in info.filename and "/3.12/" not in info.filename:
            continue
        zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
os.replace(tmp, src)
PY
du -sh .srv && ls -1 .srv
