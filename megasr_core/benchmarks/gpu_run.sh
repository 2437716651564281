#!/usr/bin/env bash
# One call on a GPU machine: the gpu-marked tests, then the GPU benchmark suite, into $OUT.
#
#   bash megasr_core/benchmarks/gpu_run.sh     # OUT defaults to gpu-run/ (ignored by git)
#
# Wheels the machine lacks (diffusers, importlib_metadata, and torchao for the fp8 rows, on the lent H100/H200 image) may be
# carried in .whl/; they are installed into /tmp/site. Budgets (seconds) fit a 10-minute call:
# GPU_TESTS_TIMEOUT (170), SUITE_BUDGET_S (330: no section starts after it), SUITE_TIMEOUT (420);
# SUITE_ARGS adds `megasr bench gpu` options (on a CPU: "--preset tiny --size 128 --steps 2 --batches 1,2
# --scopes="; SeeSR and SeeSR-Turbo beside MegaSR only: "--batches 1,8 --sections baseline,megasr_eager,
# megasr_cuda_graphs,seesr_eager,seesr_cuda_graphs,seesr_turbo_eager,seesr_turbo_cuda_graphs", no spaces).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-run}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/megasr-compile/inductor}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1
start=$(date +%s)
# -o addopts="": the project's default options ask for pytest-xdist's three processes, which the
# device may lack; the GPU tests run in one process.
timeout "${GPU_TESTS_TIMEOUT:-170}" python3 -m pytest -o addopts="" -p no:xdist -q -m gpu -p no:cacheprovider \
  tests/models/test_gpu.py tests/extractors/test_gpu.py tests/pipelines/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "gpu tests: $(( $(date +%s) - start )) s"
timeout "${SUITE_TIMEOUT:-420}" python3 -m megasr_core.cli bench gpu --budget-s "${SUITE_BUDGET_S:-330}" \
  --output "$OUT/gpu_suite.json" ${SUITE_ARGS:-} >"$OUT/gpu_suite.stdout" 2>"$OUT/gpu_suite.log"
echo "suite exit $? after $(( $(date +%s) - start )) s"
grep '^\[suite\]' "$OUT/gpu_suite.log" | tail -30
python3 - "$OUT/gpu_suite.json" <<'PY'
import json, sys
try:
    result = json.load(open(sys.argv[1]))
except Exception as error:
    sys.exit(f"no suite JSON: {error}")
print(json.dumps({k: result.get(k) for k in ("summary", "skipped", "section_seconds")}, indent=1))
for name, error in result.get("errors", {}).items():
    print(name, error["error"][:400])
PY
