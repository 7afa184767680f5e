#!/usr/bin/env bash
# Every GPU check and timing of the Triton kernels, in one device call (`bash benchmarks/kernel_check.sh`):
# kernels vs references at V4-Flash shapes (tests/gpu/test_kernels_gpu.py), the timings (benchmarks/kernels.py),
# then model logits with kernels vs references (tests/gpu/test_model_kernels_gpu.py). tests/test_gpu.py (the
# older model checks, which now run the kernels too) is left to benchmarks/device_check.sh. Full logs land in
# $OUT; the tail shows the summary.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
export XDG_CACHE_HOME=/tmp/xdg
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary() { grep -E "rel err|passed|failed|FAILED|Error|error:|s call" "$1" | tail -"$2"; }
timeout 240 python3 -m pytest -q -s -p no:cacheprovider --durations=5 tests/gpu --ignore=tests/gpu/test_model_kernels_gpu.py > "$out/pytest_kernels.txt" 2>&1
summary "$out/pytest_kernels.txt" 25
timeout 220 python3 benchmarks/kernels.py "$@" > "$out/kernels.txt" 2>&1
sed -n '/^# table/,$p' "$out/kernels.txt" | grep -v '^{' | tail -70
timeout 120 python3 -m pytest -q -s -p no:cacheprovider --durations=5 tests/gpu/test_model_kernels_gpu.py > "$out/pytest_model.txt" 2>&1
summary "$out/pytest_model.txt" 25
