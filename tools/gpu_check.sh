#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (never part of CI): the node tests on CUDA, the node
# benchmark with --device cuda (timings and torch.cuda peak memory), and the model-level peak
# estimate against torch.cuda (tools/peak_estimate.py).
# The SNN frameworks travel as wheels in .whl/ (norse, an sdist, as its installed folder in
# .whl/site/), since the machine has no registry access.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
cp -r .whl/site/* /tmp/site/ 2>/dev/null || true
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/gpu_env.txt"
python3 -m pytest -q -p no:cacheprovider tests/nodes/test_cuda.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -3
python3 tools/bench_nodes.py --device cuda --T 4 16 64 --repeat 10 --out "$OUT" > "$OUT/gpu_bench_stdout.txt" 2> "$OUT/gpu_bench_progress.txt"
tail -30 "$OUT/bench_nodes.md"
python3 tools/peak_estimate.py --device cuda --out "$OUT" > "$OUT/peak_estimate_stdout.txt" 2>&1; tail -20 "$OUT/peak_estimate_cuda.md"
