#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (never part of CI), sized to about 8 minutes in all:
#   1. the CUDA tests (tests/nodes/test_cuda.py: the Triton kernels against the PyTorch path and
#      against SpikingJelly's own Triton neuron, half inputs, launches; the PyTorch path on CUDA);
#   2. the node benchmark on CUDA (tools/bench_nodes.py): revpass's Triton kernels beside its
#      PyTorch path and SpikingJelly's Triton neuron, inputs (T, 16, 64, 16, 16) and, for the
#      SpikingJelly neurons, (T, 64, 128, 32, 32), T in 4, 16, 64;
#   3. the model benchmark on CUDA (tools/bench_memory.py --device cuda): spiking_resnet18 at batch
#      32, 32x32, T=4: peak and step time of the original, exact, reversible, recompute, planner
#      "min" and SpikingJelly memopt levels 1 and 2 (levels 3 and 4 search longer than this check
#      has: run them with --memopt 3 4 when there is time).
# Each stage has a time limit; what a stage did not finish is said in $OUT/gpu_summary.txt.
# The SNN frameworks travel as wheels in .whl/ (norse, an sdist, as its installed folder in
# .whl/site/), since the machine has no registry access: name .whl in the call's carry.
set -uo pipefail
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
cp -r .whl/site/* /tmp/site/ 2>/dev/null || true
export PYTHONPATH=/tmp/site:$PWD
summary="$OUT/gpu_summary.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))" | tee "$summary"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - t0)) s (limit $limit s)$([ $rc -eq 124 ] && echo ', CUT SHORT')" | tee -a "$summary"
}

stage "cuda tests" 200 bash -c "python3 -m pytest -q -p no:cacheprovider -rs tests/nodes/test_cuda.py -s 2>&1 | tee $OUT/gpu_tests.txt | tail -5"
stage "node bench, (T, 16, 64, 16, 16)" 120 bash -c "python3 tools/bench_nodes.py --device cuda --T 4 16 64 --repeat 10 --out $OUT/nodes_small > /dev/null 2>> $summary"
stage "node bench, (T, 64, 128, 32, 32)" 90 bash -c "python3 tools/bench_nodes.py --device cuda --T 4 16 64 --repeat 5 --batch 64 --channels 128 --hw 32 --only spikingjelly --out $OUT/nodes_large > /dev/null 2>> $summary"
stage "model bench" 150 bash -c "python3 tools/bench_memory.py --device cuda --models spiking_resnet18 --T 4 --batch 32 --repeat 5 --memopt 1 2 --out $OUT/memory > /dev/null 2>> $summary"
for f in "$OUT"/nodes_small/bench_nodes.md "$OUT"/nodes_large/bench_nodes.md "$OUT"/memory/bench_memory.md; do
    [ -f "$f" ] && grep -E "^- (PASS|MISS)|targets met" "$f" | tail -40 >> "$summary"
done
rm -f "$OUT"/nodes_large/bench_nodes.json "$OUT"/memory/bench_memory.png  # at most 8 files come back
cat "$summary"
