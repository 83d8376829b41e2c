#!/usr/bin/env bash
# The GPU work still open, one step per call of the lent machine (each under its 600 s limit), in the order to run:
#
#   bash benchmarks/lease.sh serve  # the serve extra from .srv/, diag_serve_threads, then bench_serve on ResNet-50
#                                   # fp16 and the BERT-base-sized encoder from 8 client processes   (carry .srv)
#   bash benchmarks/lease.sh suite  # ModelOpt from .whl/ and torchopt, then the whole GPU-marked suite (the serve
#                                   # tests included: the serve extra stays installed on a warm machine) (carry .whl)
#   bash benchmarks/lease.sh lowp   # bench_lowp fp8 against fp8 fast-accum (64x128, b64), then diag_lowp
#   bash benchmarks/lease.sh small  # bench_lowp int8 / int4_awq at 1x128 and b1, calibrated on the GPU
#   bash benchmarks/lease.sh cpu    # bench_serve's CPU workload from 4 client processes on the host's cores
#
# A session has 1,800 s of device time and a machine's start takes 200-270 s of it, so serve, suite and lowp fit
# one lease when the calls follow each other (the machine goes back after 30 s idle, and what was installed with
# it); small and cpu wait for the next lease. Measured before: the GPU-marked suite 232 s, bench_serve's ResNet-50
# workload 219 s (both on the H200). .whl/ and .srv/ come from fetch_gpu_wheels.sh / fetch_gpu_serve_wheels.sh;
# together they exceed one call's carry, so each step installs what it carries. Everything a step writes goes to
# $OUT (the call's returned folder), logs included.
set -uo pipefail
steps="serve suite lowp small cpu"
if [[ " $steps " != *" ${1:-none} "* ]]; then
    echo "usage: bash benchmarks/lease.sh ${steps// /|}" >&2
    exit 2
fi
out=${OUT:-/tmp/lease_out}
mkdir -p "$out"
cd "$(dirname "$0")/.."

install() {  # $1: a folder of wheels, or nothing for torchopt alone
    if [ -n "${1:-}" ]; then python3 -m pip install -q --no-deps "$1"/*.whl 2>&1 | tail -2; fi
    python3 -m pip install -q --no-deps --no-build-isolation . 2>&1 | tail -2
}

gpu_tests() {  # $1: log name, then pytest arguments
    local log=$1
    shift
    timeout 480 python3 -P -m pytest -m "gpu or multi_gpu or tensorrt" -q -p no:cacheprovider \
        -o "filterwarnings=ignore::DeprecationWarning" "$@" >"$out/$log" 2>&1
    echo "pytest rc=$?"
    tail -25 "$out/$log"
}

bench() {  # $1: seconds, $2: log name, then the script and its arguments (run from benchmarks/)
    local limit=$1 log=$2
    shift 2
    (cd benchmarks && timeout "$limit" python3 "$@" --out "$out" >"$out/$log" 2>&1)
    echo "$1 rc=$?"
    tail -12 "$out/$log"
}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null
date -u
case "${1:-}" in
serve)
    install .srv
    (cd benchmarks && timeout 120 python3 diag_serve_threads.py >"$out/diag_serve_threads.txt" 2>&1)
    tail -6 "$out/diag_serve_threads.txt"
    # One run for both workloads: results are written after each, so a run cut short keeps ResNet-50's.
    bench 420 serve_cuda.log bench_serve.py --device cuda --client-procs 8 --repeats 2 \
        --workloads resnet50_fp16 bert_base_fp16
    ;;
suite)
    install .whl
    gpu_tests gpu_tests.log tests
    ;;
lowp)
    bench 380 lowp.log bench_lowp.py --models bert vit_b_16 --shapes 64x128 b64 --formats fp8 --calib-on-cpu \
        --rounds 8 --iters 5
    (cd benchmarks && timeout 170 python3 diag_lowp.py --modes fp8 "fp8 fast-accum" --calib-on-cpu \
        >"$out/diag_lowp.txt" 2>&1)
    tail -4 "$out/diag_lowp.txt"
    ;;
small)
    bench 560 lowp_small.log bench_lowp.py --models bert vit_b_16 --shapes 1x128 b1 --formats int8 int4_awq \
        --rounds 8 --iters 5
    ;;
cpu)
    bench 400 serve_cpu.log bench_serve.py --device cpu --client-procs 4 --repeats 2
    ;;
esac
date -u
