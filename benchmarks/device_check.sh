#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (device tool: `bash benchmarks/device_check.sh`).
# Runs the whole test suite on the device's torch (2.11: the oldest we support) including tests/test_gpu.py,
# then the README's main job on the GPU in bf16.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
export XDG_CACHE_HOME=/tmp/xdg
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the device image has no fastapi/openai: the server tests run in CI, not here
skip=""; python3 -c "import fastapi, openai" 2>/dev/null || skip="--ignore-glob=tests/test_server*.py --ignore=tests/test_bench.py"
# tests/gpu (kernel sweeps) run in benchmarks/kernel_check.sh; this script stays well under the 10-minute call limit
python3 -m pytest -q -s tests --ignore=tests/gpu $skip 2>&1 | tee "$out/pytest.txt" | grep -v "^\.*$" | tail -40
python3 -m dsv4 generate "Hello" --max-new-tokens 16 --json 2>&1 | tee "$out/generate.txt"
