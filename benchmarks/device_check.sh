#!/usr/bin/env bash
# The GPU machine's correctness checks, in one device call (`bash benchmarks/device_check.sh [--full] [FILES...]`):
# every file of tests/gpu, tests/test_gpu.py (model numerics on the GPU) and tests/test_kernels_model.py, each
# under its own time limit with a one-line-per-failure summary (full logs in $OUT/tests.txt), then the README's main job
# on the GPU in bf16. FILES narrows the test files. `--full` first runs the whole CPU suite on the device's
# torch (2.11: the oldest we support; ~6 minutes there, so not every time).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
export XDG_CACHE_HOME=/tmp/xdg
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" = "--full" ]; then
  shift
  # the device image has no fastapi/openai: the server tests run in CI, not here
  skip=""; python3 -c "import fastapi, openai" 2>/dev/null || skip="--ignore-glob=tests/test_server*.py --ignore=tests/test_bench.py"
  python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/gpu $skip > "$out/pytest_full.txt" 2>&1
  grep -E "passed|failed|FAILED" "$out/pytest_full.txt" | tail -20
fi
files=("$@"); [ ${#files[@]} -eq 0 ] && files=(tests/gpu/*.py tests/test_gpu.py tests/test_kernels_model.py)
for f in "${files[@]}"; do
  log="/tmp/dsv4_$(basename "$f" .py).txt"
  timeout "${FILE_TIMEOUT:-150}" python3 -m pytest -q -s -rfE --tb=line -p no:cacheprovider "$f" > "$log" 2>&1
  rc=$?
  echo "== $f (rc $rc): $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$log" | tail -1)"
  [ $rc -eq 124 ] && echo "   TIMED OUT"
  grep -E "^(FAILED|ERROR) " "$log" | cut -c1-300 | head -12
  { echo "==== $f"; cat "$log"; } >> "$out/tests.txt"  # one file back: the device returns at most 8
done
python3 -m dsv4 generate "Hello" --max-new-tokens 16 --json > "$out/generate.txt" 2>&1; tail -3 "$out/generate.txt" | cut -c1-400
