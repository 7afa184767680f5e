#!/usr/bin/env bash
# Every kernel timing in one device call (`bash benchmarks/kernel_check.sh [kernels.py args]`): benchmarks/kernels.py,
# which also runs every benchmarks/bench_*.py. Correctness on the GPU is benchmarks/device_check.sh. Full log in
# $OUT/kernels.txt; the tail shows the table.
set -uo pipefail
export PYTHONUNBUFFERED=1
out="${OUT:-/tmp/out}"; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
export XDG_CACHE_HOME=/tmp/xdg
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "${KERNELS_TIMEOUT:-420}" python3 benchmarks/kernels.py "$@" > "$out/kernels.txt" 2>&1
sed -n '/^# table/,$p' "$out/kernels.txt" | grep -v '^{' | tail -120
grep -E "Error|error:" "$out/kernels.txt" | tail -5
