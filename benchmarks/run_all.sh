#!/usr/bin/env bash
# Run the GPU-marked tests and the benchmarks on a CUDA machine, each under its own time limit, logging to
# benchmarks/results/logs/. Usage: bash benchmarks/run_all.sh [bench_name ...]   (default: all benchmarks)
# Results: every benchmark writes its JSON + Markdown to benchmarks/results/ with device, versions and date.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=benchmarks/results/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then  # ModelOpt and its missing dependencies, from benchmarks/fetch_gpu_wheels.sh
  "$PY" -m pip install -q --no-deps .whl/*.whl
fi
"$PY" - <<'PY' | tee "$LOGS/environment.txt"
import platform, torch, triton
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "triton", triton.__version__, "python", platform.python_version())
PY
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # GPU tests only (-P: import the installed torchopt, not ./torchopt); DeprecationWarnings from other torch versions must not fail them here.
  timeout "${TEST_TIMEOUT:-240}" "$PY" -P -m pytest -m "gpu or multi_gpu or tensorrt" -q ${PYTEST_ARGS:-} -o "filterwarnings=ignore::DeprecationWarning" \
    -p no:cacheprovider tests 2>&1 | tee "$LOGS/gpu_tests.log" | tail -40
fi
BENCHES=("$@")
if [ ${#BENCHES[@]} -eq 0 ]; then
  BENCHES=(bench_preprocess bench_recipes bench_quantize bench_lowp bench_profiler bench_batch bench_dynamic_shapes bench_feeder)
fi
for b in "${BENCHES[@]}"; do
  echo "=== $b"
  start=$(date +%s)
  timeout "${BENCH_TIMEOUT:-300}" "$PY" "benchmarks/$b.py" > "$LOGS/$b.log" 2>&1
  echo "exit $? after $(( $(date +%s) - start )) s"
  tail -25 "$LOGS/$b.log"
done
