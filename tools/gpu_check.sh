#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (never part of CI): the node tests on CUDA and the node
# benchmark with --device cuda. Expects the SNN frameworks as wheels in .whl/ (see README).
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
cp -r .whl/site/* /tmp/site/ 2>/dev/null || true
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY' | tee "$OUT/gpu_env.txt"
import torch; print("torch", torch.__version__, "device", torch.cuda.get_device_name(0))
PY
python3 -m pytest -q -p no:cacheprovider tests/nodes/test_cuda.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
python3 tools/bench_nodes.py --device cuda --out "$OUT" 2>&1 | tail -60
