#!/usr/bin/env bash
# The GPU machine's correctness checks, in one device call (`bash benchmarks/device_check.sh [--full]`):
# tests/test_gpu.py (model numerics on the GPU), the whole-model Triton-vs-reference test, every kernel test in
# tests/gpu at V4-Flash shapes, then the README's main job on the GPU in bf16. `--full` first runs the whole CPU
# suite on the device's torch (2.11: the oldest we support; ~6 minutes there, so not every time).
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
export XDG_CACHE_HOME=/tmp/xdg
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary() { grep -E "rel err|passed|failed|FAILED|Error|error:" "$1" | tail -"$2"; }
if [ "${1:-}" = "--full" ]; then
  # the device image has no fastapi/openai: the server tests run in CI, not here
  skip=""; python3 -c "import fastapi, openai" 2>/dev/null || skip="--ignore-glob=tests/test_server*.py --ignore=tests/test_bench.py"
  python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/gpu $skip > "$out/pytest_full.txt" 2>&1
  summary "$out/pytest_full.txt" 20
fi
timeout 300 python3 -m pytest -q -s -p no:cacheprovider --durations=8 tests/test_gpu.py tests/test_kernels_model.py tests/gpu \
  > "$out/pytest_gpu.txt" 2>&1
summary "$out/pytest_gpu.txt" 40
python3 -m dsv4 generate "Hello" --max-new-tokens 16 --json 2>&1 | tee "$out/generate.txt" | tail -2
