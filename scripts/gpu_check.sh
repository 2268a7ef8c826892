#!/usr/bin/env bash
# One GPU check, a few minutes: the full bench table (every case and mode,
# default sizes), the in-step bench and the kernel counts, on the final code.
# Usage (on the device machine, repository root): bash scripts/gpu_check.sh [OUT_DIR]
# Writes bench.txt, instep.txt, kernels.txt and env.txt under OUT_DIR ($OUT or ./gpu_out).
set -uo pipefail
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python}"
{
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | head -3
  "$py" -c 'import jax; print("jax", jax.__version__, jax.devices())'
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
# Each step has its own time limit, so one slow step leaves the others' tables.
timeout 240 "$py" -m adamfx bench --preset default --repeats 5 > "$out/bench.txt" 2> "$out/bench.err"
echo "bench rc=$?"; cat "$out/bench.txt"
timeout 150 "$py" -m adamfx bench --in-step --repeats 5 > "$out/instep.txt" 2> "$out/instep.err"
echo "in-step rc=$?"; cat "$out/instep.txt"
timeout 90 "$py" scripts/count_kernels.py --layers 10 > "$out/kernels.txt" 2> "$out/kernels.err"
echo "kernels rc=$?"; cat "$out/kernels.txt"
